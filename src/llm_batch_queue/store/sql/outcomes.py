"""Finishing leased jobs: complete, fail (retry or give up), release — one or many at once.

A batch is one transaction that first locks its jobs' rows and keeps only those whose caller
still holds the lease: a late worker whose lease was reclaimed changes nothing (D-10). The
attempts, the jobs' new states, the items' outputs, the dependents released, the item and run
settlement, the outbox rows and the rate ledger's reconciliation all commit together (D-8,
D-11), in a fixed number of statements however large the batch.

Lock order, everywhere: the job rows (by id), then the run rows (locks.lock_run, by id), then
the open jobs and the items, then the model locks (ledger.py, by name), then the model_state
rows, then the rate ledger's rows. A claim holds model locks while it writes, so it never
waits for a run lock, an item row or an open job that a finish may hold (it skips them).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Select, select

from llm_batch_queue.jobs import GiveUp, Item, Job, JobStatus, Retry
from llm_batch_queue.store.base import Completion, Failure, Finish, Release
from llm_batch_queue.store.sql import bulk, graph, ledger, wakeups
from llm_batch_queue.store.sql.claims import NO_LEASE, SpecOf, record_attempts
from llm_batch_queue.store.sql.locks import lock_run
from llm_batch_queue.store.sql.rows import OPEN_JOB_COLUMNS, attempt_values, to_job
from llm_batch_queue.store.sql.tables import jobs


def finish(conn: Connection, spec_of: SpecOf, batch: Sequence[Finish], now: float) -> list[bool]:
    ids = sorted({f.lease.job_id for f in batch})
    rows = conn.execute(_leased_query(conn.dialect.name), {"ids": ids}).all()
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
    if taken:
        # the job's own rows first (locked above): the attempts and the jobs' new states need
        # no run lock, so finishes in other processes wait for each other only to settle
        _record(conn, taken)
        after = [_values(f, job, now) for f, job in taken]
        bulk.update_rows(conn, jobs, after, constants=NO_LEASE)
        settled = [(f, job) for f, job in taken if _settles(f)]
        released: set[str] = set()
        if settled:
            for run_id in sorted({job.run_id for _, job in settled}):
                # every writer of an item holds its run's lock: what is read next stays true
                lock_run(conn, run_id)
            states = graph.item_states(conn, {j.item_id for _, j in settled if j.item_id})
            released = _settle(conn, spec_of, settled, states, now)
        # other workers may take what is claimable now: dependents, jobs handed back unrun
        handed_back = any(isinstance(f, Release) and f.at <= now for f, _ in taken)
        if released or handed_back:
            for pipeline in sorted({row.pipeline for row in rows}):
                wakeups.announce(conn, pipeline)
    # last, so the model locks (which every claim of the model waits for) are held only from
    # here to the commit
    used = [f.used for f, _ in taken if f.used is not None]
    blocks = [f.block for f in batch if isinstance(f, Failure) and f.block is not None]
    ledger.reconcile(conn, used, blocks)
    return held


@functools.cache
def _leased_query(dialect: str) -> Select[Any]:
    return (
        select(*OPEN_JOB_COLUMNS, jobs.c.lease_token, jobs.c.pipeline)
        .where(bulk.in_param(dialect, jobs.c.id, "ids"))
        .order_by(jobs.c.id)
        .with_for_update()
    )


def _record(conn: Connection, taken: list[tuple[Finish, Job]]) -> None:
    """An attempt per completion and failure (a release ran nothing)."""
    ran = [
        attempt_values(job.id, job.stage, job.item_id, f.result)
        for f, job in taken
        if not isinstance(f, Release)
    ]
    record_attempts(conn, ran)


def _values(f: Finish, job: Job, now: float) -> dict[str, Any]:
    """The job's row after `f`: the same columns for every job, so one statement serves all."""
    counted = job.attempts + (1 if not isinstance(f, Release) and f.result.counted else 0)
    values: dict[str, Any] = {
        "id": job.id,
        "status": JobStatus.READY.value,
        "output": None,  # a job's only output is its completion's
        "attempts": counted,
        "next_run_at": job.next_run_at,
        "model_index": job.model_index,
        "model_failures": job.model_failures,
        "last_error": job.last_error,
        "updated_at": now,
    }
    if isinstance(f, Completion):
        values.update(status=JobStatus.SUCCEEDED.value, output=f.output, last_error=None)
    elif isinstance(f, Release):
        values.update(next_run_at=f.at, last_error=f.reason)
    elif isinstance(f.outcome, GiveUp):
        values.update(status=JobStatus.FAILED.value, last_error=f.outcome.reason)
    else:
        values.update(
            next_run_at=f.outcome.at,
            model_index=f.outcome.model_index,
            last_error=f.outcome.reason,
            model_failures=_model_failures(job, f.outcome, f.result.counted),
        )
    return values


def _model_failures(job: Job, retry: Retry, counted: bool) -> int:
    """Counted failures in a row on the model the retry will use."""
    if retry.model_index != job.model_index:
        return 0
    return job.model_failures + 1 if counted else job.model_failures


def _settles(f: Finish) -> bool:
    """A completion or a give-up settles its job; retries and releases leave the graph as is."""
    return isinstance(f, Completion) or (isinstance(f, Failure) and isinstance(f.outcome, GiveUp))


def _settle(
    conn: Connection,
    spec_of: SpecOf,
    settled: list[tuple[Finish, Job]],
    states: Mapping[str, Item],
    now: float,
) -> set[str]:
    """Outputs and errors onto the items of the settled jobs, then what follows (graph.settle).
    The caller holds the runs' locks."""
    touched = {job.run_id: graph.Touched() for _, job in settled}
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
    return graph.settle(conn, spec_of, touched, now, states=states, outputs=outputs, errors=errors)
