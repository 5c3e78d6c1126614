"""The rate ledger: requests and tokens per model and window slot, and requests per provider day.

Admission reads a model's slots, asks the pure policy (`limits.Quota`) and books — all while
holding a per-model lock (an advisory lock on PostgreSQL, the database write lock taken by BEGIN
IMMEDIATE on SQLite), so two processes can never both see the last free slot (D-1). A claim books
all its jobs on a model with one write; reconciliation adds what the calls really used.

Lock order: see outcomes.py. Rows are written in key order (model, slot or day).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Connection,
    Executable,
    Select,
    Table,
    bindparam,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from llm_batch_queue.jobs import Reservation
from llm_batch_queue.limits import (
    Admission,
    Deny,
    ModelLimits,
    Quota,
    Usage,
    Verdict,
    WindowEntry,
    day_start,
    slot_time,
    window_slot,
)
from llm_batch_queue.retry import ModelBlock
from llm_batch_queue.store._ledger import LedgerChange, booked, reconciled
from llm_batch_queue.store.base import ModelState, Used
from llm_batch_queue.store.memory import IN_FLIGHT_TTL_S, KEEP_DAYS_S
from llm_batch_queue.store.sql.locks import advisory_lock, try_advisory_lock
from llm_batch_queue.store.sql.tables import model_state, rate_days, rate_slots

PRUNE_ODDS = 1 / 64  # prune on about one booking write in 64: cheap, and the ledger stays small


def lock_model(conn: Connection, model: str, *, wait: bool = True) -> bool:
    name = f"lbq:rate:{model}"
    if wait:
        advisory_lock(conn, name)
        return True
    return try_advisory_lock(conn, name)


def usage(conn: Connection, model: str, limits: ModelLimits, now: float) -> Usage:
    since = window_slot(now - limits.span_s)
    window = conn.execute(_WINDOW, {"model": model, "since": since}).all()
    flying, today, until = conn.execute(
        _COUNTERS,
        {
            "model": model,
            "flying_since": window_slot(now - IN_FLIGHT_TTL_S),
            "day": day_start(now, limits.day_tz),
        },
    ).one()
    return Usage(
        window=[WindowEntry(slot_time(slot), tokens, n) for slot, tokens, n in window],
        day_requests=today or 0,
        in_flight=max(0, flying or 0),
        blocked_until=until or 0.0,
    )


def _counters() -> Select[Any]:
    """In-flight count, today's requests and the block of :model, in one read."""
    s, model = rate_slots.c, bindparam("model", type_=rate_slots.c.model.type)
    in_flight = (
        select(func.coalesce(func.sum(s.open), 0))
        .where(s.model == model, s.slot > bindparam("flying_since"), s.open > 0)
        .scalar_subquery()
    )
    day = (
        select(rate_days.c.requests)
        .where(rate_days.c.model == model, rate_days.c.day == bindparam("day"))
        .scalar_subquery()
    )
    blocked = (
        select(model_state.c.blocked_until).where(model_state.c.model == model).scalar_subquery()
    )
    return select(in_flight, day, blocked)


_s = rate_slots.c
_WINDOW = select(_s.slot, _s.tokens, _s.requests).where(
    _s.model == bindparam("model"), _s.slot >= bindparam("since")
)
_COUNTERS = _counters()
_ADD_TO_SLOT = (
    update(rate_slots)
    .where(_s.model == bindparam("m"), _s.slot == bindparam("s"))
    .values(
        requests=_s.requests + bindparam("dr"),
        tokens=_s.tokens + bindparam("dt"),
        open=_s.open + bindparam("do"),
    )
)
_STATES = select(model_state.c.model, model_state.c.blocked_until, model_state.c.reason)


@dataclass
class Bookings:
    """One transaction's admissions; written with one upsert per model and slot (`write`)."""

    conn: Connection
    now: float
    admission: Admission | None = None
    quotas: dict[str, Quota] = field(default_factory=dict)
    made: list[Reservation] = field(default_factory=list)
    _days: dict[str, float] = field(default_factory=dict)  # day_start by time zone: once a claim

    def book(self, model: str, limits: ModelLimits, tokens: int) -> Reservation | Deny:
        """The caller holds the model's lock (lock_model)."""
        quota = self.quotas.get(model)
        if quota is None:
            usage_now = usage(self.conn, model, limits, self.now)
            quota = self.quotas[model] = Quota(limits, usage_now, self.now, self.admission)
        verdict: Verdict = quota.book(tokens)
        if isinstance(verdict, Deny):
            return verdict
        now, tz = self.now, limits.day_tz
        if (day := self._days.get(tz)) is None:
            day = self._days[tz] = day_start(now, tz)
        made = Reservation(model, tokens, now, window_slot(now), day, tz)
        self.made.append(made)
        return made

    def write(self) -> None:
        apply(self.conn, booked(self.made))
        if self.made and random.random() < PRUNE_ODDS:
            prune(self.conn, self.now)


def reserve(
    conn: Connection,
    model: str,
    limits: ModelLimits,
    tokens: int,
    now: float,
    admission: Admission | None = None,
) -> Reservation | Deny:
    lock_model(conn, model)
    bookings = Bookings(conn, now, admission)
    verdict = bookings.book(model, limits, tokens)
    bookings.write()
    return verdict


def reconcile(conn: Connection, used: Sequence[Used], blocks: Sequence[ModelBlock] = ()) -> None:
    """Replace estimates with what the provider counted (see _ledger.reconciled), and park
    the models in `blocks`.

    Every writer of a model's ledger rows and block holds the model's lock, taken in name
    order, so admissions see a whole change or none of it, and no two transactions lock those
    rows in opposite orders (refunds taken without the lock deadlocked with each other and
    with claims: found by the adversarial trial).
    """
    change = reconciled(used)
    for model in sorted(change.models | {b.model for b in blocks}):
        lock_model(conn, model)
    for b in sorted(blocks, key=lambda b: b.model):  # a block only ever moves later
        block(conn, b.model, b.until, b.reason)
    apply(conn, change)


def apply(conn: Connection, change: LedgerChange) -> None:
    existing = [
        {"m": m, "s": slot, "dr": r, "dt": t, "do": o}
        for (m, slot), (r, t, o) in sorted(change.existing.items())
    ]
    _each(conn, _ADD_TO_SLOT, existing)
    created = [
        {"model": m, "slot": slot, "requests": r, "tokens": t, "open": o}
        for (m, slot), (r, t, o) in sorted(change.created.items())
    ]
    _each(conn, _create_slots(conn.dialect.name), created)
    days = [{"model": m, "day": d, "requests": n} for (m, d), n in sorted(change.days.items()) if n]
    _each(conn, _count_days(conn.dialect.name), days)


def _each(conn: Connection, statement: Executable, rows: list[dict[str, Any]]) -> None:
    """Run `statement` once per row, in row order. A change is usually one row, and psycopg's
    executemany (a pipeline) costs several times a plain execute for a single row."""
    if len(rows) == 1:
        conn.execute(statement, rows[0])
    elif rows:
        conn.execute(statement, rows)


@functools.cache
def _create_slots(dialect: str) -> postgresql.Insert | sqlite.Insert:
    insert = _upsert(dialect, rate_slots)
    return insert.on_conflict_do_update(
        index_elements=[_s.model, _s.slot],
        set_={
            "requests": _s.requests + insert.excluded.requests,
            "tokens": _s.tokens + insert.excluded.tokens,
            "open": _s.open + insert.excluded.open,
        },
    )


@functools.cache
def _count_days(dialect: str) -> postgresql.Insert | sqlite.Insert:
    insert = _upsert(dialect, rate_days)
    return insert.on_conflict_do_update(
        index_elements=[rate_days.c.model, rate_days.c.day],
        set_={"requests": rate_days.c.requests + insert.excluded.requests},
    )


def _upsert(dialect: str, table: Table) -> postgresql.Insert | sqlite.Insert:
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def prune(conn: Connection, now: float) -> None:
    conn.execute(
        delete(rate_slots).where(rate_slots.c.slot < window_slot(now - IN_FLIGHT_TTL_S - 120.0))
    )
    conn.execute(delete(rate_days).where(rate_days.c.day < now - KEEP_DAYS_S))


def block(conn: Connection, model: str, until: float, reason: str) -> None:
    """Upsert that only ever moves blocked_until later (a shorter cool-down never shortens)."""
    insert = _upsert(conn.dialect.name, model_state)
    conn.execute(
        insert.values(model=model, blocked_until=until, reason=reason).on_conflict_do_update(
            index_elements=[model_state.c.model],
            set_={"blocked_until": insert.excluded.blocked_until, "reason": insert.excluded.reason},
            where=model_state.c.blocked_until < insert.excluded.blocked_until,
        )
    )


def state(conn: Connection, model: str, now: float) -> ModelState:
    row = conn.execute(select(model_state).where(model_state.c.model == model)).first()
    if row is None or row.blocked_until <= now:
        return ModelState(model, 0.0, None)
    return ModelState(model, row.blocked_until, row.reason)


def states(conn: Connection, models: Iterable[str] | None = None) -> dict[str, tuple[float, str]]:
    """Every model's block (until, reason), in one read: a claim looks up many."""
    query = _STATES
    if models is not None:
        query = query.where(model_state.c.model.in_(list(models)))
    return {m: (until, reason or "") for m, until, reason in conn.execute(query)}
