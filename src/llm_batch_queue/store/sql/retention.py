"""Store.purge_finished_runs in SQL: clear old finished runs' payloads and outputs, in one
transaction, never before the run's final notification was sent (D-29)."""

from __future__ import annotations

from sqlalchemy import Connection, select, update

from llm_batch_queue.jobs import NotificationStatus, RunStatus
from llm_batch_queue.store.base import Purge
from llm_batch_queue.store.milestones import RUN_FINISHED, final_key
from llm_batch_queue.store.sql.tables import items, jobs, outbox, runs


def purge_finished(conn: Connection, retention_s: float, now: float) -> Purge:
    # FOR NO KEY UPDATE like locks.lock_run, skipping a run an admin is reopening right now
    # (the next purge takes it if it is still finished); the WHERE is checked again on lock
    candidates = conn.execute(
        select(runs.c.id, runs.c.round, runs.c.notify)
        .where(
            runs.c.status != RunStatus.RUNNING.value,
            runs.c.finished_at <= now - retention_s,
            runs.c.purged_at.is_(None),
        )
        .order_by(runs.c.finished_at, runs.c.id)
        .with_for_update(key_share=True, skip_locked=True)
    ).all()
    if not candidates:
        return Purge()
    sent = {
        (run_id, key)
        for run_id, key in conn.execute(
            select(outbox.c.run_id, outbox.c.key).where(
                outbox.c.run_id.in_([c.id for c in candidates]),
                outbox.c.kind == RUN_FINISHED,
                outbox.c.status == NotificationStatus.SENT.value,
            )
        )
    }
    result = Purge()
    for c in candidates:
        wants_final = RUN_FINISHED in c.notify
        if wants_final and (c.id, final_key(c.round)) not in sent:
            result.waiting.append(c.id)
        else:
            result.purged.append(c.id)
    if result.purged:
        conn.execute(
            update(items).where(items.c.run_id.in_(result.purged)).values(payload=None, outputs={})
        )
        conn.execute(update(jobs).where(jobs.c.run_id.in_(result.purged)).values(output=None))
        conn.execute(update(runs).where(runs.c.id.in_(result.purged)).values(purged_at=now))
    return result
