"""Item and run settlement in SQL: what follows once a job has settled.

The decisions come from transitions.py and milestones.py, as in MemoryStore. Callers hold the
run lock (locks.lock_run) before calling in here, and these functions lock the open jobs they read
(FOR UPDATE): a concurrent claim either committed first — and we see the job RUNNING — or skips
the locked job (SKIP LOCKED) and later finds it cancelled. Either order is one MemoryStore could
produce.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from sqlalchemy import ColumnElement, Connection, func, select, update

from llm_batch_queue import transitions
from llm_batch_queue.jobs import ItemStatus, JobStatus, RunCounts, RunStatus, Scope, StageSpec
from llm_batch_queue.store.milestones import Milestones
from llm_batch_queue.store.sql import outbox
from llm_batch_queue.store.sql.rows import to_item
from llm_batch_queue.store.sql.tables import items, jobs, runs

_OPEN = (JobStatus.PENDING.value, JobStatus.READY.value)


@dataclass(frozen=True, slots=True)
class RunSpec:
    """The immutable part of a run that settlement needs (cached by the store)."""

    stages: Mapping[str, StageSpec]
    notify: frozenset[str]


def milestones(conn: Connection, run_id: str, spec: RunSpec) -> Milestones:
    return Milestones(run_id, spec.notify, lambda *args: outbox.add(conn, *args))


def counts(conn: Connection, run_id: str) -> RunCounts:
    result = RunCounts()
    for status, n in conn.execute(
        select(items.c.status, func.count())
        .where(items.c.run_id == run_id)
        .group_by(items.c.status)
    ):
        result.items_by_status[status] = n
    for stage, status, n in conn.execute(
        select(jobs.c.stage, jobs.c.status, func.count())
        .where(jobs.c.run_id == run_id)
        .group_by(jobs.c.stage, jobs.c.status)
    ):
        result.jobs_by_stage_status[(stage, status)] = n
    return result


def after_settle(
    conn: Connection, run_id: str, item_id: str | None, spec: RunSpec, now: float
) -> set[str]:
    """Advance the item (if any) and the run; returns the ids of jobs made READY."""
    released: set[str] = set()
    if item_id is not None:
        released |= _settle_item(conn, run_id, item_id, spec, now)
    return released | advance_run(conn, run_id, spec, now)


def _settle_item(
    conn: Connection, run_id: str, item_id: str, spec: RunSpec, now: float
) -> set[str]:
    siblings = _load(conn, jobs.c.item_id == item_id)
    step = transitions.item_step(spec.stages, {s: st for s, (_, st) in siblings.items()})
    released = _apply(conn, step, siblings, now)
    statuses = _after(step, siblings)
    row = conn.execute(select(items).where(items.c.id == item_id)).one()
    item = to_item(row)
    status = transitions.item_status(statuses)
    if status is ItemStatus.NEEDS_REUPLOAD and item.status is not status:
        item = replace(item, failures=item.failures + 1)
        milestones(conn, run_id, spec).item_failed(item, now)
    conn.execute(
        update(items)
        .where(items.c.id == item_id)
        .values(status=status.value, failures=item.failures)
    )
    milestones(conn, run_id, spec).stages_settled(counts(conn, run_id), spec.stages, now)
    return released


def advance_run(conn: Connection, run_id: str, spec: RunSpec, now: float) -> set[str]:
    """Start run-scope jobs once every item has settled; finish the run when all is done."""
    status = conn.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar_one()
    if status != RunStatus.RUNNING.value:
        return set()
    tally = counts(conn, run_id)
    unsettled = sum(
        n
        for (stage, st), n in tally.jobs_by_stage_status.items()
        if spec.stages[stage].scope is Scope.ITEM and not JobStatus(st).settled
    )
    run_jobs = _load(conn, (jobs.c.run_id == run_id) & (jobs.c.item_id.is_(None)))
    step = transitions.run_step(
        spec.stages, {s: st for s, (_, st) in run_jobs.items()}, unsettled == 0
    )
    released = _apply(conn, step, run_jobs, now)
    if unsettled:
        return released
    finished = transitions.run_status(_after(step, run_jobs), tally.items_by_status)
    if finished is not RunStatus.RUNNING:
        conn.execute(
            update(runs).where(runs.c.id == run_id).values(status=finished.value, finished_at=now)
        )
        milestones(conn, run_id, spec).run_finished(finished, tally, now)
    return released


def _load(conn: Connection, where: ColumnElement[bool]) -> dict[str, tuple[str, JobStatus]]:
    """Stage -> (job id, status), in creation order; open jobs locked first (see module doc)."""
    conn.execute(select(jobs.c.id).where(where, jobs.c.status.in_(_OPEN)).with_for_update()).all()
    rows = conn.execute(
        select(jobs.c.stage, jobs.c.id, jobs.c.status).where(where).order_by(jobs.c.position)
    )
    return {stage: (job_id, JobStatus(status)) for stage, job_id, status in rows}


def _apply(
    conn: Connection,
    step: transitions.GraphStep,
    found: Mapping[str, tuple[str, JobStatus]],
    now: float,
) -> set[str]:
    ready = [found[s][0] for s in step.ready]
    if ready:
        conn.execute(
            update(jobs)
            .where(jobs.c.id.in_(ready))
            .values(status=JobStatus.READY.value, next_run_at=now, updated_at=now)
        )
    cancel = [found[s][0] for s in step.cancel]
    if cancel:
        conn.execute(
            update(jobs)
            .where(jobs.c.id.in_(cancel))
            .values(status=JobStatus.CANCELLED.value, updated_at=now)
        )
    return set(ready)


def _after(
    step: transitions.GraphStep, found: Mapping[str, tuple[str, JobStatus]]
) -> dict[str, JobStatus]:
    statuses = {s: st for s, (_, st) in found.items()}
    statuses.update(dict.fromkeys(step.ready, JobStatus.READY))
    statuses.update(dict.fromkeys(step.cancel, JobStatus.CANCELLED))
    return statuses
