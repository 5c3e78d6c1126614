"""Stores: the Protocol, an in-memory implementation and the SQLAlchemy one."""

from llm_batch_queue.jobs import Reservation
from llm_batch_queue.store.base import Leased, ModelState, Store
from llm_batch_queue.store.memory import MemoryStore

__all__ = ["Leased", "MemoryStore", "ModelState", "Reservation", "Store"]
