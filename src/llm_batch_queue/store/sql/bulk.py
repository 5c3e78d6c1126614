"""Writing many rows at once: one statement for every row of a batch.

A claim or a finish changes every job and item of its batch. On PostgreSQL the rows travel as
one JSON document unpacked by json_to_recordset: one statement to parse, plan and execute
whatever the batch size, where a statement per row cost the worker ~20 µs of Python and the
server a round of executor start-up for each. SQLite runs in-process, where executemany of a
prepared statement is already cheap.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Table,
    Update,
    all_,
    any_,
    bindparam,
    column,
    func,
    literal_column,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSON
from sqlalchemy.types import TypeEngine


def update_rows(
    conn: Connection,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    key: str = "id",
    constants: Mapping[str, Any] | None = None,
    merged: tuple[str, ...] = (),
) -> None:
    """Set each row's columns (every row names the same ones, `key` included) where key
    matches, and `constants` in every one of them. PostgreSQL only: the JSON columns in
    `merged` get the row's keys added to theirs (jsonb `||`) rather than replaced."""
    if not rows:
        return
    names, fixed = tuple(rows[0]), tuple(constants or {})
    if merged and conn.dialect.name != "postgresql":
        raise ValueError("merged columns are a PostgreSQL statement")
    statement = _update(conn.dialect.name, table, names, key, fixed, merged)
    params = {f"c_{n}": value for n, value in (constants or {}).items()}
    if conn.dialect.name == "postgresql":
        conn.execute(statement, {"rows": list(rows), **params})
        return
    conn.execute(statement, [{**{f"b_{n}": row[n] for n in names}, **params} for row in rows])


# Statements are built once per shape and kept: building one costs the worker more than
# executing it (SQLAlchemy's cache keys and compiled forms are memoised on the object).
@functools.cache
def _update(
    dialect: str,
    table: Table,
    names: tuple[str, ...],
    key: str,
    fixed: tuple[str, ...],
    merged: tuple[str, ...] = (),
) -> Update:
    if overlap := set(names) & set(fixed):
        raise ValueError(f"columns given both per row and as constants: {sorted(overlap)}")
    sets: dict[str, Any] = {n: bindparam(f"c_{n}", type_=table.c[n].type) for n in fixed}
    if dialect == "postgresql":
        v = _recordset(table, names)
        sets.update({n: v.c[n] for n in names if n != key})
        sets.update({n: table.c[n].op("||")(v.c[n]) for n in merged})
        return update(table).where(table.c[key] == v.c[key]).values(sets)
    sets.update({n: bindparam(f"b_{n}") for n in names if n != key})
    return update(table).where(table.c[key] == bindparam(f"b_{key}")).values(sets)


def _recordset(table: Table, names: tuple[str, ...]) -> Any:
    """json_to_recordset(:rows) AS v(name type, ...), typed like the table's columns."""
    return recordset(*((n, table.c[n].type) for n in names))


def recordset(*typed: tuple[str, TypeEngine[Any]]) -> Any:
    """json_to_recordset(:rows) AS v(name type, ...): the rows bound as one JSON parameter
    (PostgreSQL)."""
    return (
        func.json_to_recordset(bindparam("rows", type_=JSON))
        .table_valued(*(column(n, type_) for n, type_ in typed))
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
    return col == any_(bindparam(None, list(values), type_=_array_of(col)))


def not_among(
    conn: Connection, col: ColumnElement[Any], values: Collection[Any]
) -> ColumnElement[bool]:
    """`col NOT IN values` (`col <> ALL(:array)` on PostgreSQL, see `among`)."""
    if conn.dialect.name != "postgresql":
        return col.not_in(list(values))
    return col != all_(bindparam(None, list(values), type_=_array_of(col)))


@functools.cache
def _array_of(col: ColumnElement[Any]) -> ARRAY[Any]:
    return ARRAY(col.type)


def in_param(dialect: str, col: ColumnElement[Any], name: str) -> ColumnElement[bool]:
    """`among` for a statement built once: the values are bound at execution as `name` (a
    list), as `= ANY(:name)` on PostgreSQL and an expanding IN elsewhere."""
    if dialect != "postgresql":
        return col.in_(bindparam(name, expanding=True))
    return col == any_(bindparam(name, type_=_array_of(col)))


def not_in_param(dialect: str, col: ColumnElement[Any], name: str) -> ColumnElement[bool]:
    """`not_among` for a statement built once (see in_param)."""
    if dialect != "postgresql":
        return col.not_in(bindparam(name, expanding=True))
    return col != all_(bindparam(name, type_=_array_of(col)))


def one_of(col: ColumnElement[Any], values: Sequence[str]) -> ColumnElement[bool]:
    """`col IN ('a', 'b')` with the values (our own status names) written into the SQL: a
    bound list would be expanded into the statement's text again on every execution."""
    if not all(v.isidentifier() for v in values):
        raise ValueError(f"not a constant name: {values!r}")
    return col.in_([literal_column(f"'{v}'") for v in values])
