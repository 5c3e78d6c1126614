"""Locks that make check-then-write steps atomic on PostgreSQL.

SQLite needs none of these: every writing transaction there begins with BEGIN IMMEDIATE, which
serialises all writers of the database file. SQLAlchemy renders no FOR UPDATE on SQLite, so the
same queries serve both.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import BigInteger, Connection, bindparam, func, select

from llm_batch_queue.store.sql.tables import runs

_KEY = bindparam("key", type_=BigInteger)
_LOCK = select(func.pg_advisory_xact_lock(_KEY))
_TRY_LOCK = select(func.pg_try_advisory_xact_lock(_KEY))
_RUN = select(runs.c.id).where(runs.c.id == bindparam("id"))
_LOCK_RUN = {
    wait: _RUN.with_for_update(key_share=True, skip_locked=not wait) for wait in (True, False)
}


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for pg_advisory_xact_lock (Python's hash() is salted)."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def advisory_lock(conn: Connection, name: str) -> None:
    """Held until the transaction ends."""
    if conn.dialect.name == "postgresql":
        conn.execute(_LOCK, {"key": advisory_key(name)})


def lock_run(conn: Connection, run_id: str, *, wait: bool = True) -> bool:
    """Serialise the item/run transitions of one run (read siblings, then decide).

    FOR NO KEY UPDATE, so inserts that merely reference the run (outbox rows) do not block.
    With wait=False a run locked by someone else returns False at once: claim uses that so it
    never waits while holding job locks that a settling transaction may need (no deadlock).
    """
    if conn.dialect.name != "postgresql":
        return True
    return conn.execute(_LOCK_RUN[wait], {"id": run_id}).first() is not None


def try_advisory_lock(conn: Connection, name: str) -> bool:
    """Like advisory_lock, but False at once if another transaction holds it."""
    if conn.dialect.name != "postgresql":
        return True
    return bool(conn.execute(_TRY_LOCK, {"key": advisory_key(name)}).scalar())
