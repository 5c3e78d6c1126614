"""Schema migrations, run from code: the Alembic scripts ship inside the package.

`upgrade(engine)` is idempotent and safe when several processes start at once: the whole upgrade
runs in one transaction that first takes a lock — a transaction-scoped advisory lock on
PostgreSQL, BEGIN IMMEDIATE on SQLite — so the second process waits, then finds the schema at
head and does nothing.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, func, inspect, select

from llm_batch_queue.store.sql.engine import WRITE, make_engine, sqlite_path
from llm_batch_queue.store.sql.locks import advisory_key

SCRIPT_LOCATION = "llm_batch_queue.store.sql:migrations"
VERSION_TABLE = "lbq_alembic_version"  # keep in step with migrations/env.py


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config built in code: no alembic.ini needed (or shipped)."""
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current(connection: Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def holds_queue(url: str | Path) -> bool:
    """Does the database at `url` already hold the queue's tables? Creates nothing: a SQLite
    file that does not exist is not made, and no table is created anywhere (a read-only command
    pointed at a mistyped path or the wrong database should say so, not set one up)."""
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return False
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return inspect(conn).has_table(VERSION_TABLE)
    finally:
        engine.dispose()


def upgrade(engine: Engine, revision: str = "head") -> None:
    target = head() if revision == "head" else revision
    with engine.connect() as conn:
        if _at(conn, target):  # the common case: a plain read, no write lock
            conn.rollback()
            return
    with engine.connect().execution_options(**{WRITE: True}) as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(advisory_key("lbq:migrate"))))
        command.upgrade(alembic_config(conn), revision)


def _at(conn: Connection, target: str | None) -> bool:
    return current(conn) == target
