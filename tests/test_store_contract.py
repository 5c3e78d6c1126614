"""Runs the Store contract (store_contract.py) on every store: memory, SQLite, PostgreSQL."""

from __future__ import annotations

from store_contract import StoreContract


class TestStore(StoreContract):
    pass
