"""The SQL Store (SQLite and PostgreSQL via SQLAlchemy) and `open_store`.

Importing this package imports SQLAlchemy and Alembic; `llm_batch_queue` and
`llm_batch_queue.store` do not, so the core stays usable without them.
"""

from __future__ import annotations

from pathlib import Path

from llm_batch_queue.store.base import Store
from llm_batch_queue.store.memory import MemoryStore
from llm_batch_queue.store.sql.engine import make_engine
from llm_batch_queue.store.sql.fencing import fence
from llm_batch_queue.store.sql.schema import holds_queue, upgrade
from llm_batch_queue.store.sql.store import SQLStore

__all__ = ["SQLStore", "fence", "holds_queue", "make_engine", "open_store", "upgrade"]


def open_store(url: str | Path, *, migrate: bool = True) -> Store:
    """`memory://` gives a MemoryStore; anything else (a URL or a SQLite file path) a SQLStore."""
    if str(url) == "memory://":
        return MemoryStore()
    return SQLStore(url, migrate=migrate)
