"""Finishing a leased job: complete, fail (retry or give up), release.

Each is one transaction that first locks the job row on the condition that the caller still
holds its lease (claims.take): a late worker whose lease was reclaimed gets LeaseLost and changes
nothing (D-10). The attempt, the job's new state, the item's output, the dependents it releases,
the item/run settlement and the outbox rows all commit together (D-8, D-11).

Lock order, everywhere: the job row, then the run row (locks.lock_run), then the open jobs and
the item. Claims never wait for a run lock, so this order cannot deadlock with them.
"""

from __future__ import annotations

from sqlalchemy import Connection, select, update

from llm_batch_queue.jobs import JSON, AttemptResult, GiveUp, JobStatus, Lease, Outcome
from llm_batch_queue.store.sql import graph
from llm_batch_queue.store.sql.claims import NO_LEASE, SpecOf, leased_update, record, take
from llm_batch_queue.store.sql.locks import lock_run
from llm_batch_queue.store.sql.tables import items


def complete(
    conn: Connection,
    spec_of: SpecOf,
    lease: Lease,
    result: AttemptResult,
    output: JSON,
    now: float,
) -> None:
    job = take(conn, lease)
    record(conn, job, result)
    leased_update(
        conn,
        lease,
        status=JobStatus.SUCCEEDED.value,
        output=output,
        attempts=job.attempts + (1 if result.counted else 0),
        last_error=None,
        updated_at=now,
        **NO_LEASE,
    )
    lock_run(conn, job.run_id)
    if job.item_id is not None:
        # read-modify-write of the outputs is safe: every writer of an item holds the run lock
        outputs = conn.execute(select(items.c.outputs).where(items.c.id == job.item_id)).scalar()
        conn.execute(
            update(items)
            .where(items.c.id == job.item_id)
            .values(outputs={**(outputs or {}), job.stage: output})
        )
    spec = spec_of(conn, job.run_id)
    graph.after_settle(conn, job.run_id, job.item_id, spec, now, (job.stage,))


def fail(
    conn: Connection,
    spec_of: SpecOf,
    lease: Lease,
    result: AttemptResult,
    outcome: Outcome,
    now: float,
) -> None:
    job = take(conn, lease)
    record(conn, job, result)
    counted = job.attempts + (1 if result.counted else 0)
    if isinstance(outcome, GiveUp):
        leased_update(
            conn,
            lease,
            status=JobStatus.FAILED.value,
            attempts=counted,
            last_error=outcome.reason,
            updated_at=now,
            **NO_LEASE,
        )
        lock_run(conn, job.run_id)
        if job.item_id is not None:
            conn.execute(
                update(items)
                .where(items.c.id == job.item_id)
                .values(error=f"{job.stage}: {outcome.reason}")
            )
        spec = spec_of(conn, job.run_id)
        graph.after_settle(conn, job.run_id, job.item_id, spec, now, (job.stage,))
        return
    # a retry changes only this job, and leaves the graph as it was: no run lock needed
    same_model = outcome.model_index == job.model_index
    if result.counted:
        model_failures = job.model_failures + 1 if same_model else 0
    else:
        model_failures = job.model_failures if same_model else 0
    leased_update(
        conn,
        lease,
        status=JobStatus.READY.value,
        attempts=counted,
        next_run_at=outcome.at,
        model_index=outcome.model_index,
        last_error=outcome.reason,
        model_failures=model_failures,
        updated_at=now,
        **NO_LEASE,
    )


def release(conn: Connection, lease: Lease, at: float, reason: str, now: float) -> None:
    """Hand the job back unrun: no attempt recorded, claimable again at `at`."""
    leased_update(
        conn,
        lease,
        status=JobStatus.READY.value,
        next_run_at=at,
        last_error=reason,
        updated_at=now,
        **NO_LEASE,
    )
