"""Engine creation: URL handling and the SQLite connection setup the store relies on.

SQLite serialises writers only if each writing transaction starts with BEGIN IMMEDIATE; the
sqlite3 driver's own implicit BEGIN is deferred (and skipped for SELECT), which would let two
processes both read, then both write. So SQLite engines get SQLAlchemy's documented recipe:
the driver's transaction handling off, and a `begin` hook that emits BEGIN itself — IMMEDIATE
when the connection carries the `lbq_write` execution option.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from llm_batch_queue.errors import ConfigError

WRITE = "lbq_write"  # execution option: this transaction writes (BEGIN IMMEDIATE on SQLite)
BUSY_TIMEOUT_S = 30.0


def to_url(url_or_path: str | Path) -> str:
    """Accept SQLAlchemy URLs, bare file paths (SQLite) and `postgres://` URLs."""
    text = str(url_or_path)
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser().resolve()}"
    scheme, rest = text.split("://", 1)
    if scheme in ("postgres", "postgresql"):  # psycopg 3 is the driver we ship and test
        return f"postgresql+psycopg://{rest}"
    return text


def sqlite_path(url_or_path: str | Path) -> Path | None:
    """The file of a SQLite URL or path; None for an in-memory database or another backend."""
    url = make_url(to_url(url_or_path))
    if url.get_backend_name() != "sqlite" or (url.database or "") in ("", ":memory:"):
        return None
    return Path(url.database or "")


def make_engine(url_or_path: str | Path, **kwargs: Any) -> Engine:
    url = make_url(to_url(url_or_path))
    if url.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        if url.get_backend_name() == "postgresql":
            kwargs.setdefault("json_deserializer", _json_loads)
        try:
            return create_engine(url, **kwargs)
        except ModuleNotFoundError as exc:
            raise ConfigError(
                f"the database URL {url.render_as_string(hide_password=True)} needs the driver"
                f" {exc.name!r}, which is not installed"
                + (
                    ": pip install 'llm-batch-queue[postgres]'"
                    if "postgres" in url.drivername
                    else "; llm-batch-queue supports SQLite and PostgreSQL"
                )
            ) from None
    database = url.database or ""
    if database in ("", ":memory:"):
        # one shared connection, or every checkout would see a new empty database
        kwargs.setdefault("poolclass", StaticPool)
        kwargs.setdefault("connect_args", {"check_same_thread": False})
    else:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {"timeout": BUSY_TIMEOUT_S})
    engine = create_engine(url, **kwargs)
    configure_sqlite(engine)
    return engine


def _json_loads(data: bytes | str) -> Any:
    """What psycopg parses JSON columns with: json.loads given bytes first sniffs their
    encoding, which cost more than parsing the small documents a job row holds."""
    return json.loads(data.decode() if isinstance(data, bytes) else data)


def is_memory_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite" and (engine.url.database or "") in ("", ":memory:")


def configure_sqlite(engine: Engine) -> None:
    """Install the connect/begin hooks on a SQLite engine (idempotent)."""
    if event.contains(engine, "connect", _on_connect):
        return
    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "begin", _on_begin)
    if isinstance(engine.pool, StaticPool):
        # its one connection may exist already, and disposing it would drop a memory database
        with engine.connect() as conn:
            _prepare(conn.connection.dbapi_connection)
    else:
        engine.pool.dispose()  # pooled connections predate the connect hook


def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    _prepare(dbapi_connection)


def _prepare(dbapi_connection: Any) -> None:
    assert isinstance(dbapi_connection, sqlite3.Connection)
    dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    cursor.execute("PRAGMA foreign_keys = ON")
    _wal(cursor)  # readers never block the writer
    cursor.execute("PRAGMA synchronous = NORMAL")  # durable enough under WAL
    cursor.close()


def _wal(cursor: sqlite3.Cursor) -> None:
    """Switch to WAL, waiting for other connections as the busy timeout would: the switch needs
    the file to itself and SQLite answers "database is locked" at once rather than waiting (a
    fresh file opened by several processes or threads at the same moment). The mode persists,
    so on an existing WAL file this is a no-op."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _on_begin(conn: Connection) -> None:
    write = conn.get_execution_options().get(WRITE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def wait_until_reachable(
    url: str | Path, timeout_s: float, on_retry: Callable[[Exception], None] | None = None
) -> None:
    """Connect to `url` until it answers or `timeout_s` has passed (then its error is raised):
    a worker started while its database is still starting or restarting (a supervisor at boot,
    a restart mid-deploy) waits for it instead of exiting. SQLite answers at once."""
    if make_url(to_url(url)).get_backend_name() == "sqlite":
        return
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    engine = make_engine(url)
    try:
        while True:
            try:
                with engine.connect():
                    return
            except OperationalError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                if on_retry is not None:
                    on_retry(exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
    finally:
        engine.dispose()
