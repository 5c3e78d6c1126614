"""Alembic environment for llm-batch-queue's own tables.

The store runs this programmatically with a connection in `config.attributes["connection"]`,
already inside the transaction that holds the migration lock. For writing new revisions from
the command line, pass a URL instead: `alembic -c <ini with script_location and sqlalchemy.url>`.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from llm_batch_queue.store.sql.tables import metadata

VERSION_TABLE = "lbq_alembic_version"  # our own, so an app's alembic history can share the db


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER much
        # only our tables: an app may keep its own tables in the same database
        include_name=lambda name, type_, _parent: (
            type_ != "table" or bool(name and name.startswith("lbq_"))
        ),
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set sqlalchemy.url or pass a connection in config.attributes")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


main()
