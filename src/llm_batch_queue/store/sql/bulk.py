"""Writing many rows at once: one UPDATE, executed for every row of a batch.

A claim or a finish changes every job and item of its batch; the statement is prepared once and
sent for all rows together (pipelined by psycopg on PostgreSQL, in-process on SQLite).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Table, bindparam, update


def update_rows(
    conn: Connection,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    key: str = "id",
    constants: Mapping[str, Any] | None = None,
) -> None:
    """Set each row's columns (every row names the same ones, `key` included) where key
    matches, and `constants` in every one of them."""
    if not rows:
        return
    names = list(rows[0])
    sets: dict[str, Any] = {n: bindparam(f"b_{n}") for n in names if n != key}
    sets.update(constants or {})
    conn.execute(
        update(table).where(table.c[key] == bindparam(f"b_{key}")).values(sets),
        [{f"b_{n}": row[n] for n in names} for row in rows],
    )
