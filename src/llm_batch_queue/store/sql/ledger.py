"""The rate ledger: one row per booked request, read and written in one locked transaction.

`reserve` reads the model's bookings, asks the pure `limits.admit` policy, and books — all while
holding a per-model lock (an advisory lock on PostgreSQL, the database write lock taken by
BEGIN IMMEDIATE on SQLite), so two processes can never both see the last free slot (D-1).
"""

from __future__ import annotations

from sqlalchemy import Connection, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from llm_batch_queue.limits import Deny, ModelLimits, Usage, WindowEntry, admit, day_start
from llm_batch_queue.store.base import ModelState, Reservation
from llm_batch_queue.store.memory import IN_FLIGHT_TTL_S
from llm_batch_queue.store.sql.locks import advisory_lock
from llm_batch_queue.store.sql.tables import model_state, rate_ledger

KEEP_S = 26 * 3600.0  # the provider day is at most 25 h long; older bookings never matter again
PRUNE_EVERY = 64  # prune on every n-th booking: cheap, and the ledger stays small


def reserve(
    conn: Connection, model: str, limits: ModelLimits, tokens: int, now: float
) -> Reservation | Deny:
    advisory_lock(conn, f"lbq:rate:{model}")
    verdict = admit(limits, usage(conn, model, limits, now), tokens, now)
    if isinstance(verdict, Deny):
        return verdict
    booked = conn.execute(
        rate_ledger.insert()
        .values(model=model, at=now, tokens=tokens, open=True)
        .returning(rate_ledger.c.id)
    ).scalar_one()
    if booked % PRUNE_EVERY == 0:
        conn.execute(delete(rate_ledger).where(rate_ledger.c.at < now - KEEP_S))
    return Reservation(booked, model, tokens, now)


def usage(conn: Connection, model: str, limits: ModelLimits, now: float) -> Usage:
    ledger = rate_ledger.c
    window = conn.execute(
        select(ledger.at, ledger.tokens).where(
            ledger.model == model, ledger.at > now - limits.span_s
        )
    )
    since_day = day_start(now, limits.day_tz)
    day_requests, in_flight = conn.execute(
        select(
            func.count().filter(ledger.at >= since_day),
            func.count().filter(ledger.open, ledger.at > now - IN_FLIGHT_TTL_S),
        ).where(ledger.model == model, ledger.at >= min(since_day, now - IN_FLIGHT_TTL_S))
    ).one()
    blocked = conn.execute(
        select(model_state.c.blocked_until).where(model_state.c.model == model)
    ).scalar_one_or_none()
    return Usage(
        window=[WindowEntry(at, tok) for at, tok in window],
        day_requests=day_requests,
        in_flight=in_flight,
        blocked_until=blocked or 0.0,
    )


def reconcile(
    conn: Connection, reservation: Reservation, tokens: int, sent_at: float | None
) -> None:
    values: dict[str, object] = {"tokens": max(0, tokens), "open": False}  # < 0 frees nothing
    if sent_at is not None and sent_at > reservation.at:
        values["at"] = sent_at  # the booking is only ever moved later (see Store.reconcile)
    if "at" in values or tokens > reservation.tokens:
        # it takes quota: not in the middle of another process's admission decision
        advisory_lock(conn, f"lbq:rate:{reservation.model}")
    conn.execute(update(rate_ledger).where(rate_ledger.c.id == reservation.id).values(values))


def block(conn: Connection, model: str, until: float, reason: str) -> None:
    """Upsert that only ever moves blocked_until later (a shorter cool-down never shortens)."""
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(
        model_state
    )
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
