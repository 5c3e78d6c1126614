"""Item and run settlement in SQL: what follows once a job has settled.

The decisions come from transitions.py and milestones.py, as in MemoryStore. Callers hold the
run lock (locks.lock_run) before calling in here, and these functions lock the open jobs they read
(FOR UPDATE): a concurrent claim either committed first — and we see the job RUNNING — or skips
the locked job (SKIP LOCKED) and later finds it cancelled. Either order is one MemoryStore could
produce.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
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
    """The run's milestones in its current round (which admin retries change, so not cached)."""
    round_ = conn.execute(select(runs.c.round).where(runs.c.id == run_id)).scalar_one()
    return Milestones(run_id, spec.notify, lambda *args: outbox.add(conn, *args), round_)


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
    conn: Connection,
    run_id: str,
    item_id: str | None,
    spec: RunSpec,
    now: float,
    changed: Collection[str] | None = None,
) -> set[str]:
    """Advance the item (if any) and the run; returns the ids of jobs made READY.

    `changed` names the stages whose jobs just settled (None: check every stage). Only the stages
    that changed are checked for milestones, and the run only when an item settled, so the cost
    per completion does not grow with the size of the run.
    """
    released: set[str] = set()
    item_settled = True
    if item_id is not None:
        ready, item_settled, touched = _settle_item(conn, run_id, item_id, spec, now)
        released |= ready
        stages = touched | (set(changed) if changed is not None else set(spec.stages))
        _stage_milestones(conn, run_id, spec, stages, now)
    if item_settled:
        released |= advance_run(conn, run_id, spec, now)
    return released


def _settle_item(
    conn: Connection, run_id: str, item_id: str, spec: RunSpec, now: float
) -> tuple[set[str], bool, set[str]]:
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
    if status is not item.status or item.failures != to_item(row).failures:
        conn.execute(
            update(items)
            .where(items.c.id == item_id)
            .values(status=status.value, failures=item.failures)
        )
    return released, all(st.settled for st in statuses.values()), set(step.cancel)


def _stage_milestones(
    conn: Connection, run_id: str, spec: RunSpec, stages: set[str], now: float
) -> None:
    # in the graph's order, as MemoryStore writes simultaneous milestones
    item_stages = [s for s, st in spec.stages.items() if s in stages and st.scope is Scope.ITEM]
    for name in item_stages:
        if _any_unsettled(conn, run_id, [name]):
            continue
        tally = RunCounts()
        for status, n in conn.execute(
            select(jobs.c.status, func.count())
            .where(jobs.c.run_id == run_id, jobs.c.stage == name)
            .group_by(jobs.c.status)
        ):
            tally.jobs_by_stage_status[(name, status)] = n
        milestones(conn, run_id, spec).stages_settled(tally, {name: spec.stages[name]}, now)


def _any_unsettled(conn: Connection, run_id: str, stages: list[str]) -> bool:
    """EXISTS over the (run_id, stage, status) index: O(1) however large the run."""
    unsettled = (JobStatus.PENDING.value, JobStatus.READY.value, JobStatus.RUNNING.value)
    query = select(jobs.c.id).where(
        jobs.c.run_id == run_id, jobs.c.stage.in_(stages), jobs.c.status.in_(unsettled)
    )
    return conn.execute(query.limit(1)).first() is not None


def advance_run(conn: Connection, run_id: str, spec: RunSpec, now: float) -> set[str]:
    """Start run-scope jobs once every item has settled; finish the run when all is done."""
    status = conn.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar_one()
    if status != RunStatus.RUNNING.value:
        return set()
    item_stages = [name for name, s in spec.stages.items() if s.scope is Scope.ITEM]
    if item_stages and _any_unsettled(conn, run_id, item_stages):
        return set()
    run_jobs = _load(conn, (jobs.c.run_id == run_id) & (jobs.c.item_id.is_(None)))
    step = transitions.run_step(spec.stages, {s: st for s, (_, st) in run_jobs.items()}, True)
    released = _apply(conn, step, run_jobs, now)
    tally = counts(conn, run_id)
    finished = transitions.run_status(_after(step, run_jobs), tally.items_by_status)
    if finished is not RunStatus.RUNNING:
        conn.execute(
            update(runs).where(runs.c.id == run_id).values(status=finished.value, finished_at=now)
        )
        milestones(conn, run_id, spec).run_finished(finished, tally, now)
    return released


def restart_item(conn: Connection, item_id: str, spec: RunSpec, now: float) -> ItemStatus:
    """After an admin retry reset some of the item's jobs to PENDING: make READY those whose
    dependencies succeeded, and say what the item's status is now."""
    siblings = _load(conn, jobs.c.item_id == item_id)
    step = transitions.item_step(spec.stages, {s: st for s, (_, st) in siblings.items()})
    _apply(conn, step, siblings, now)
    return transitions.item_status(_after(step, siblings))


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
