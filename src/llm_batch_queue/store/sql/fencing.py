"""Fencing a side effect with the job's lease, for effects written to the queue's own database.

A worker can lose its job while it works (its lease expired and another worker took the job
over, or an admin skipped it); its completion is then refused (D-10), but rows it committed on
its own would stay. Written in a transaction that first calls `fence`, they commit only while
the lease still holds: the job's row stays locked until that transaction ends, so the takeover
or the skip waits for it, or has already happened and the effect rolls back.

The job's completion is still a transaction of its own, after this one: a skip that lands
between the two finds the effect written (make it idempotent, as any retried effect must be).
"""

from __future__ import annotations

from sqlalchemy import Connection, select

from llm_batch_queue.errors import LeaseLost
from llm_batch_queue.jobs import JobStatus, Lease
from llm_batch_queue.store.sql.tables import jobs


def fence(conn: Connection, lease: Lease) -> None:
    """Raise LeaseLost unless `lease` (StageContext.lease) still holds its job; lock the job's
    row until `conn`'s transaction ends. Call it first in the transaction of the effect."""
    row = conn.execute(
        select(jobs.c.status, jobs.c.lease_token).where(jobs.c.id == lease.job_id).with_for_update()
    ).first()
    if row is None or row.status != JobStatus.RUNNING.value or row.lease_token != lease.token:
        raise LeaseLost(
            f"job {lease.job_id} is no longer this worker's (taken over, skipped or finished):"
            " its effect was not written"
        )
