"""The outbox: notification rows written in the transaction that caused them, sent after commit."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from llm_batch_queue.jobs import JSON, Notification, NotificationStatus
from llm_batch_queue.store.outbox import IN_DOUBT_ERROR, check_resolvable
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
            "status": NotificationStatus.PENDING.value,
            "attempts": 0,
            "created_at": now,
            "next_attempt_at": 0.0,
        },
    )


def pending(conn: Connection, now: float, limit: int) -> list[Notification]:
    rows = conn.execute(
        select(outbox)
        .where(outbox.c.status == NotificationStatus.PENDING.value, outbox.c.next_attempt_at <= now)
        .order_by(outbox.c.id)
        .limit(limit)
    )
    return [to_notification(r) for r in rows]


def claim(
    conn: Connection, now: float, limit: int, hold_s: float, idempotent: bool
) -> list[Notification]:
    """Take due rows for sending: they are committed as `sending`, held for `hold_s`, before
    anything is sent. SKIP LOCKED keeps concurrent claims on PostgreSQL apart; SQLite writes one
    at a time. A row still `sending` after its hold lost its sender between claim and mark: with
    an idempotent transport it is taken again (the resend carries the same key), otherwise it
    becomes `in_doubt`, and nothing sends it again unless an admin says so (resolve)."""
    sending = NotificationStatus.SENDING.value
    expired = (outbox.c.status == sending) & (outbox.c.next_attempt_at <= now)
    if not idempotent:
        conn.execute(
            update(outbox)
            .where(expired)
            .values(
                status=NotificationStatus.IN_DOUBT.value,
                attempts=outbox.c.attempts + 1,
                error=IN_DOUBT_ERROR,
            )
        )
    due = (outbox.c.status == NotificationStatus.PENDING.value) & (outbox.c.next_attempt_at <= now)
    rows = conn.execute(
        select(outbox.c.id)
        .where(or_(due, expired) if idempotent else due)
        .order_by(outbox.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if not rows:
        return []
    ids = [r.id for r in rows]
    conn.execute(
        update(outbox)
        .where(outbox.c.id.in_(ids))
        .values(status=sending, next_attempt_at=now + hold_s)
    )
    return [
        to_notification(r)
        for r in conn.execute(select(outbox).where(outbox.c.id.in_(ids)).order_by(outbox.c.id))
    ]


def mark(
    conn: Connection,
    notification_id: int,
    *,
    sent: bool,
    now: float,
    error: str | None,
    retry_at: float | None,
    in_doubt: bool,
    provider_id: str | None,
) -> bool:
    """Record how a send went. `sent` always applies (it is news from the transport, whatever
    the row's state; only the first send time is kept); a failure only to a row still `sending`,
    so a sender that took longer than its hold cannot undo what another decided meanwhile."""
    query = update(outbox).where(outbox.c.id == notification_id)
    attempts = outbox.c.attempts + 1
    if sent:
        query = query.where(outbox.c.status != NotificationStatus.SENT.value).values(
            status=NotificationStatus.SENT.value,
            sent_at=now,
            attempts=attempts,
            error=None,
            provider_id=provider_id,
        )
    else:
        values: dict[str, Any] = {"attempts": attempts, "error": error}
        if in_doubt:
            values["status"] = NotificationStatus.IN_DOUBT.value
        elif retry_at is not None:
            values.update(status=NotificationStatus.PENDING.value, next_attempt_at=retry_at)
        else:
            values["status"] = NotificationStatus.FAILED.value
        query = query.where(outbox.c.status == NotificationStatus.SENDING.value).values(**values)
    if conn.execute(query).rowcount:
        return True
    if conn.execute(select(outbox.c.id).where(outbox.c.id == notification_id)).first() is None:
        raise KeyError(notification_id)
    return False


def resolve(conn: Connection, notification_id: int, *, resend: bool, now: float) -> Notification:
    row = conn.execute(
        select(outbox).where(outbox.c.id == notification_id).with_for_update()
    ).first()
    if row is None:
        raise KeyError(f"no notification {notification_id}")
    check_resolvable(to_notification(row))
    if resend:
        values = {"status": NotificationStatus.PENDING.value, "next_attempt_at": now}
    else:
        values = {"status": NotificationStatus.SENT.value, "sent_at": now, "error": None}
    conn.execute(update(outbox).where(outbox.c.id == notification_id).values(**values))
    return to_notification(conn.execute(select(outbox).where(outbox.c.id == notification_id)).one())


def for_run(conn: Connection, run_id: str) -> list[Notification]:
    rows = conn.execute(select(outbox).where(outbox.c.run_id == run_id).order_by(outbox.c.id))
    return [to_notification(r) for r in rows]
