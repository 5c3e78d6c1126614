"""Finishing leased jobs: complete, fail (retry or give up), release — one or many at once.

A batch is one transaction that first locks its jobs' rows and keeps only those whose caller
still holds the lease: a late worker whose lease was reclaimed changes nothing (D-10). The
attempts, the jobs' new states, the items' outputs, the dependents released, the item and run
settlement, the outbox rows and the rate ledger's reconciliation all commit together (D-8,
D-11), in a fixed number of statements however large the batch.

Lock order, everywhere: the job rows (by id), then the model locks (ledger.py), then the run
rows (locks.lock_run, by id), then the open jobs and the items. Claims never wait for a run
lock, so this order cannot deadlock with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from llm_batch_queue.jobs import GiveUp, Job, JobStatus, Retry
from llm_batch_queue.store.base import Completion, Failure, Finish, Release
from llm_batch_queue.store.sql import graph, ledger, wakeups
from llm_batch_queue.store.sql.claims import SpecOf
from llm_batch_queue.store.sql.locks import lock_run
from llm_batch_queue.store.sql.rows import attempt_values, to_job
from llm_batch_queue.store.sql.tables import attempts, items, jobs


def finish(conn: Connection, spec_of: SpecOf, batch: Sequence[Finish], now: float) -> list[bool]:
    rows = conn.execute(
        select(jobs)
        .where(jobs.c.id.in_(sorted({f.lease.job_id for f in batch})))
        .order_by(jobs.c.id)
        .with_for_update()
    ).all()
    leased = {
        row.id: row for row in rows if row.status == JobStatus.RUNNING.value and row.lease_token
    }
    held: list[bool] = []
    taken: list[tuple[Finish, Job]] = []
    for f in batch:
        row = leased.get(f.lease.job_id)
        ok = row is not None and row.lease_token == f.lease.token
        held.append(ok)
        if ok:
            taken.append((f, to_job(leased.pop(f.lease.job_id))))  # once, even if listed twice
    ledger.reconcile(conn, [f.used for f, _ in taken if f.used is not None])
    for f in batch:
        if isinstance(f, Failure) and f.block is not None:
            ledger.block(conn, f.block.model, f.block.until, f.block.reason)
    if taken:
        _record(conn, taken)
        conn.execute(_UPDATE, [_values(f, job, now) for f, job in taken])
        released = _settle(conn, spec_of, taken, now)
        # other workers may take what is claimable now: dependents, jobs handed back unrun
        handed_back = any(isinstance(f, Release) and f.at <= now for f, _ in taken)
        if released or handed_back:
            for pipeline in sorted({row.pipeline for row in rows}):
                wakeups.announce(conn, pipeline)
    return held


def _record(conn: Connection, taken: list[tuple[Finish, Job]]) -> None:
    """An attempt per completion and failure (a release ran nothing)."""
    ran = [(f, job) for f, job in taken if not isinstance(f, Release)]
    item_ids = {job.item_id for _, job in ran if job.item_id is not None}
    keys = (
        dict(conn.execute(select(items.c.id, items.c.key).where(items.c.id.in_(item_ids))).all())
        if item_ids
        else {}
    )
    if ran:
        conn.execute(
            attempts.insert(),
            [
                attempt_values(job.id, job.stage, keys.get(job.item_id or ""), f.result)
                for f, job in ran
                if not isinstance(f, Release)
            ],
        )


_UPDATE = (
    update(jobs)
    .where(jobs.c.id == bindparam("b_id"))
    .values(
        status=bindparam("b_status"),
        output=bindparam("b_output"),
        attempts=bindparam("b_attempts"),
        next_run_at=bindparam("b_next"),
        model_index=bindparam("b_model"),
        model_failures=bindparam("b_failures"),
        last_error=bindparam("b_error"),
        updated_at=bindparam("b_now"),
        lease_token=None,
        lease_expires_at=None,
        leased_by=None,
    )
)


def _values(f: Finish, job: Job, now: float) -> dict[str, Any]:
    """The job's row after `f`: every column _UPDATE sets, so one statement serves the batch."""
    counted = job.attempts + (1 if not isinstance(f, Release) and f.result.counted else 0)
    values: dict[str, Any] = {
        "b_id": job.id,
        "b_status": JobStatus.READY.value,
        "b_output": job.output,
        "b_attempts": counted,
        "b_next": job.next_run_at,
        "b_model": job.model_index,
        "b_failures": job.model_failures,
        "b_error": job.last_error,
        "b_now": now,
    }
    if isinstance(f, Completion):
        values.update(b_status=JobStatus.SUCCEEDED.value, b_output=f.output, b_error=None)
    elif isinstance(f, Release):
        values.update(b_next=f.at, b_error=f.reason)
    elif isinstance(f.outcome, GiveUp):
        values.update(b_status=JobStatus.FAILED.value, b_error=f.outcome.reason)
    else:
        values.update(
            b_next=f.outcome.at,
            b_model=f.outcome.model_index,
            b_error=f.outcome.reason,
            b_failures=_model_failures(job, f.outcome, f.result.counted),
        )
    return values


def _model_failures(job: Job, retry: Retry, counted: bool) -> int:
    """Counted failures in a row on the model the retry will use."""
    if retry.model_index != job.model_index:
        return 0
    return job.model_failures + 1 if counted else job.model_failures


def _settle(
    conn: Connection, spec_of: SpecOf, taken: list[tuple[Finish, Job]], now: float
) -> set[str]:
    """Outputs and errors onto the items, then what follows from the settled jobs."""
    settled = [
        (f, job)
        for f, job in taken
        if isinstance(f, Completion) or (isinstance(f, Failure) and isinstance(f.outcome, GiveUp))
    ]
    if not settled:
        return set()  # retries and releases leave the graph as it was: no run lock needed
    touched: dict[str, graph.Touched] = {}
    for run_id in sorted({job.run_id for _, job in settled}):
        lock_run(conn, run_id)
        touched[run_id] = graph.Touched()
    outputs: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for f, job in settled:
        t = touched[job.run_id]
        if job.item_id is None:
            t.run_jobs = True
            continue
        t.items.add(job.item_id)
        t.stages.add(job.stage)
        if isinstance(f, Completion):
            outputs.setdefault(job.item_id, {})[job.stage] = f.output
        elif isinstance(f, Failure) and isinstance(f.outcome, GiveUp):
            errors[job.item_id] = f"{job.stage}: {f.outcome.reason}"
    if outputs:
        # read-modify-write of the outputs is safe: every writer of an item holds the run lock
        current = dict(
            conn.execute(select(items.c.id, items.c.outputs).where(items.c.id.in_(outputs))).all()
        )
        conn.execute(
            update(items).where(items.c.id == bindparam("b_id")).values(outputs=bindparam("b_o")),
            [{"b_id": i, "b_o": {**(current.get(i) or {}), **new}} for i, new in outputs.items()],
        )
    if errors:
        conn.execute(
            update(items).where(items.c.id == bindparam("b_id")).values(error=bindparam("b_e")),
            [{"b_id": i, "b_e": e} for i, e in errors.items()],
        )
    return graph.settle(conn, spec_of, touched, now)
