"""The outbox: notification rows written in the transaction that caused them, sent after commit."""

from __future__ import annotations

from sqlalchemy import Connection, Insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from llm_batch_queue.jobs import JSON, Notification
from llm_batch_queue.store.sql.rows import to_notification
from llm_batch_queue.store.sql.tables import outbox


def insert_or_ignore(conn: Connection) -> Insert:
    """INSERT ... ON CONFLICT DO NOTHING on the (run, kind, key) dedupe key."""
    keys = [outbox.c.run_id, outbox.c.kind, outbox.c.key]
    if conn.dialect.name == "postgresql":
        return postgresql.insert(outbox).on_conflict_do_nothing(index_elements=keys)
    return sqlite.insert(outbox).on_conflict_do_nothing(index_elements=keys)


def add(conn: Connection, run_id: str, kind: str, key: str, payload: JSON, now: float) -> None:
    conn.execute(
        insert_or_ignore(conn),
        {
            "run_id": run_id,
            "kind": kind,
            "key": key,
            "payload": payload,
            "status": "pending",
            "attempts": 0,
            "created_at": now,
            "next_attempt_at": 0.0,
        },
    )


def pending(conn: Connection, now: float, limit: int) -> list[Notification]:
    rows = conn.execute(
        select(outbox)
        .where(outbox.c.status == "pending", outbox.c.next_attempt_at <= now)
        .order_by(outbox.c.id)
        .limit(limit)
    )
    return [to_notification(r) for r in rows]


def claim(conn: Connection, now: float, limit: int, hold_s: float) -> list[Notification]:
    """Take due rows for sending: pushing next_attempt_at past `hold_s` in the same transaction
    hides them from other dispatchers (SKIP LOCKED on PostgreSQL; SQLite writes one at a time).
    A sender that dies before marking its row lets it come due again after `hold_s`."""
    rows = conn.execute(
        select(outbox)
        .where(outbox.c.status == "pending", outbox.c.next_attempt_at <= now)
        .order_by(outbox.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if rows:
        conn.execute(
            update(outbox)
            .where(outbox.c.id.in_([r.id for r in rows]))
            .values(next_attempt_at=now + hold_s)
        )
    return [to_notification(r) for r in rows]


def mark(
    conn: Connection,
    notification_id: int,
    *,
    sent: bool,
    now: float,
    error: str | None,
    retry_at: float | None,
) -> None:
    query = update(outbox).where(outbox.c.id == notification_id)
    attempts = outbox.c.attempts + 1
    if sent:
        query = query.values(status="sent", sent_at=now, attempts=attempts, error=None)
    elif retry_at is not None:
        query = query.values(attempts=attempts, error=error, next_attempt_at=retry_at)
    else:
        query = query.values(status="failed", attempts=attempts, error=error)
    if conn.execute(query).rowcount == 0:
        raise KeyError(notification_id)


def for_run(conn: Connection, run_id: str) -> list[Notification]:
    rows = conn.execute(select(outbox).where(outbox.c.run_id == run_id).order_by(outbox.c.id))
    return [to_notification(r) for r in rows]
