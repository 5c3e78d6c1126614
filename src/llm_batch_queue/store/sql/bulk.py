"""Writing many rows at once: one statement for every row of a batch.

A claim or a finish changes every job and item of its batch. On PostgreSQL the rows travel as
one JSON document unpacked by json_to_recordset: one statement to parse, plan and execute
whatever the batch size, where a statement per row cost the worker ~20 µs of Python and the
server a round of executor start-up for each. SQLite runs in-process, where executemany of a
prepared statement is already cheap.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Table,
    all_,
    any_,
    bindparam,
    column,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSON


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
    if conn.dialect.name == "postgresql":
        v = _recordset(table, names, rows)
        sets: dict[str, Any] = {n: v.c[n] for n in names if n != key}
        sets.update(constants or {})
        conn.execute(update(table).where(table.c[key] == v.c[key]).values(sets))
        return
    binds: dict[str, Any] = {n: bindparam(f"b_{n}") for n in names if n != key}
    binds.update(constants or {})
    conn.execute(
        update(table).where(table.c[key] == bindparam(f"b_{key}")).values(binds),
        [{f"b_{n}": row[n] for n in names} for row in rows],
    )


def insert_rows(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """INSERT every row (all name the same columns) in one statement on PostgreSQL."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        conn.execute(table.insert(), list(rows))
        return
    names = list(rows[0])
    v = _recordset(table, names, rows)
    conn.execute(insert(table).from_select(names, select(*(v.c[n] for n in names))))


def _recordset(table: Table, names: list[str], rows: Sequence[Mapping[str, Any]]) -> Any:
    """json_to_recordset(:rows) AS v(name type, ...), typed like the table's columns."""
    doc = bindparam("rows", list(rows), type_=JSON)
    return (
        func.json_to_recordset(doc)
        .table_valued(*(column(n, table.c[n].type) for n in names))
        .render_derived(name="v", with_types=True)
    )


def among(
    conn: Connection, col: ColumnElement[Any], values: Collection[Any]
) -> ColumnElement[bool]:
    """`col IN values`. On PostgreSQL as `col = ANY(:array)`: one parameter instead of one per
    value, so a batch's statement is the same text at every size (psycopg prepares it) and
    binding 128 ids costs half the Python of an expanded IN list."""
    if conn.dialect.name != "postgresql":
        return col.in_(list(values))
    return col == any_(bindparam(None, list(values), type_=ARRAY(col.type)))


def not_among(
    conn: Connection, col: ColumnElement[Any], values: Collection[Any]
) -> ColumnElement[bool]:
    """`col NOT IN values` (`col <> ALL(:array)` on PostgreSQL, see `among`)."""
    if conn.dialect.name != "postgresql":
        return col.not_in(list(values))
    return col != all_(bindparam(None, list(values), type_=ARRAY(col.type)))
