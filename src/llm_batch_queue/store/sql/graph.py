"""Item and run settlement in SQL: what follows once a job has settled.

The decisions come from transitions.py and milestones.py, as in MemoryStore. Callers hold the
run lock (locks.lock_run) before calling in here, and these functions lock the open jobs they read
(_lock_open, which never waits for a row a finish may hold): a concurrent claim either committed
first — and we see the job RUNNING — or skips the locked job (SKIP LOCKED) and later finds it
cancelled. Either order is one MemoryStore could produce.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, bindparam, func, null, select, update

from llm_batch_queue import transitions
from llm_batch_queue.jobs import Item, ItemStatus, JobStatus, RunCounts, RunStatus, Scope, StageSpec
from llm_batch_queue.store.milestones import Milestones
from llm_batch_queue.store.sql import bulk, outbox
from llm_batch_queue.store.sql.tables import items, jobs, runs

_OPEN = (JobStatus.PENDING.value, JobStatus.READY.value)
_RUN_STATUS = select(runs.c.status).where(runs.c.id == bindparam("id"))
_LOCK_OPEN_TIMEOUT_S = 30.0  # then the finish fails and is retried, as after a lost connection


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


@dataclass
class Touched:
    """What settled in one run in one transaction: jobs of these items and stages, or of the
    run's own stages."""

    items: set[str] = field(default_factory=set)
    stages: set[str] = field(default_factory=set)
    run_jobs: bool = False


def after_settle(
    conn: Connection,
    run_id: str,
    item_id: str | None,
    spec: RunSpec,
    now: float,
    changed: Collection[str] | None = None,
) -> set[str]:
    """Advance the item (if any) and the run after one job settled (see `settle`)."""
    touched = Touched(
        items={item_id} if item_id is not None else set(),
        stages=set(changed) if changed is not None else set(spec.stages),
        run_jobs=item_id is None,
    )
    return settle(conn, lambda _conn, _run: spec, {run_id: touched}, now)


def item_states(conn: Connection, item_ids: Collection[str]) -> dict[str, Item]:
    """The items' state without their payloads (which settlement never reads), by id. On
    PostgreSQL without their outputs too: settle adds new outputs to the stored ones in its
    UPDATE (jsonb ||), so they are neither read nor sent back, however large they grew."""
    if not item_ids:
        return {}
    dialect = conn.dialect.name
    rows = conn.execute(_item_states_query(dialect), {"ids": sorted(item_ids)}).all()
    return {
        id_: Item(id_, run_id, key, ItemStatus(status), None, outputs or {}, error, failures)
        for id_, run_id, key, status, outputs, error, failures in rows
    }


def _merges_outputs(dialect: str) -> bool:
    return dialect == "postgresql"


@functools.cache
def _item_states_query(dialect: str) -> Select[Any]:
    c = items.c
    outputs = null() if _merges_outputs(dialect) else c.outputs
    return select(c.id, c.run_id, c.key, c.status, outputs, c.error, c.failures).where(
        bulk.in_param(dialect, c.id, "ids")
    )


def settle(
    conn: Connection,
    spec_of: Callable[[Connection, str], RunSpec],
    touched: Mapping[str, Touched],
    now: float,
    *,
    states: Mapping[str, Item] | None = None,
    outputs: Mapping[str, Mapping[str, Any]] | None = None,
    errors: Mapping[str, str] | None = None,
) -> set[str]:
    """Advance the items and runs whose jobs just settled; returns the ids of jobs made READY.

    The callers hold the runs' locks. `states` are the items as read in this transaction (read
    here if not given); `outputs` and `errors` are the stage outputs and failure reasons to
    store on them, written with their new status in one statement. A whole batch costs a fixed
    number of statements. Only the stages that changed are checked for milestones, and a run
    only when one of its items (or run jobs) settled, so the cost does not grow with the run.
    """
    outputs, errors = outputs or {}, errors or {}
    item_ids = sorted(set().union(*(t.items for t in touched.values())))
    cancelled: dict[str, set[str]] = {run_id: set() for run_id in touched}
    settled_runs = {run_id for run_id, t in touched.items() if t.run_jobs or not t.items}
    released: set[str] = set()
    if item_ids:
        siblings = _load_items(conn, item_ids)
        if states is None:
            states = item_states(conn, item_ids)
        ready: list[str] = []
        cancel: list[str] = []
        changed: list[dict[str, Any]] = []
        for item_id in item_ids:
            item = states[item_id]
            spec = spec_of(conn, item.run_id)
            found = siblings[item_id]
            step = transitions.item_step(spec.stages, {s: st for s, (_, st) in found.items()})
            ready += [found[s][0] for s in step.ready]
            cancel += [found[s][0] for s in step.cancel]
            cancelled[item.run_id] |= set(step.cancel)
            statuses = _after(step, found)
            new = Item(
                item.id,
                item.run_id,
                item.key,
                transitions.item_status(statuses),
                item.payload,
                {**item.outputs, **outputs.get(item_id, {})},
                errors.get(item_id, item.error),
                item.failures,
            )
            if new.status is ItemStatus.NEEDS_REUPLOAD and item.status is not new.status:
                new = replace(new, failures=item.failures + 1)
                milestones(conn, item.run_id, spec).item_failed(new, now)
            if new != item:
                changed.append(
                    {"id": item_id, "status": new.status.value, "outputs": new.outputs,
                     "error": new.error, "failures": new.failures}
                )  # fmt: skip
            if all(st.settled for st in statuses.values()):
                settled_runs.add(item.run_id)
        released |= _mark(conn, ready, JobStatus.READY, now)
        _mark(conn, cancel, JobStatus.CANCELLED, now)
        merged = ("outputs",) if _merges_outputs(conn.dialect.name) else ()
        bulk.update_rows(conn, items, changed, merged=merged)
    for run_id in sorted(touched):
        spec = spec_of(conn, run_id)
        busy = bool(touched[run_id].items) and _stage_milestones(
            conn, run_id, spec, touched[run_id].stages | cancelled[run_id], now
        )
        # a stage with jobs left means the run has nothing to advance: skip asking again
        if run_id in settled_runs and not busy:
            released |= advance_run(conn, run_id, spec, now)
    return released


def _load_items(
    conn: Connection, item_ids: list[str]
) -> dict[str, dict[str, tuple[str, JobStatus]]]:
    """Per item: stage -> (job id, status), in creation order; its open jobs locked."""
    found: dict[str, dict[str, tuple[str, JobStatus]]] = {i: {} for i in item_ids}
    rows = _lock_open(conn, _siblings_query(conn.dialect.name), {"ids": item_ids})
    for item_id, stage, job_id, status, _ in rows:
        found[item_id][stage] = (job_id, JobStatus(status))
    return found


@functools.cache
def _siblings_query(dialect: str) -> Select[Any]:
    return _locking_read(bulk.in_param(dialect, jobs.c.item_id, "ids"))


def _locking_read(where: ColumnElement[bool]) -> Select[Any]:
    """(item_id, stage, id, status, held) of the jobs matching `where`, in creation order,
    locking the open ones no one else holds (held: this transaction holds the row's lock)."""
    open_ = (
        select(jobs.c.id)
        .where(where, bulk.one_of(jobs.c.status, _OPEN))
        .order_by(jobs.c.id)
        .with_for_update(skip_locked=True)
        .subquery()
    )
    held = open_.c.id.is_not(None)
    return (
        select(jobs.c.item_id, jobs.c.stage, jobs.c.id, jobs.c.status, held)
        .select_from(jobs.outerjoin(open_, open_.c.id == jobs.c.id))
        .where(where)
        .order_by(jobs.c.position)
    )


def _lock_open(conn: Connection, query: Select[Any], params: Mapping[str, Any]) -> Sequence[Any]:
    """Run a `_locking_read` until it holds every open job it reads, never waiting for a row;
    its rows.

    The caller holds the run lock. A plain FOR UPDATE could deadlock: a job still ready in
    this statement's snapshot may have been claimed since, and the finish of it lock its row
    and wait for our run lock; PostgreSQL would make us wait for that finish (EvalPlanQual
    follows the row to its newest version). So open jobs are locked only if free (SKIP
    LOCKED), and for one someone else holds — a claim in progress, which waits for nothing we
    hold — the read is tried again in a moment. A job claimed meanwhile reads as running and
    needs no lock. One statement both reads the jobs and locks the open ones.
    """
    deadline = time.monotonic() + _LOCK_OPEN_TIMEOUT_S
    while True:
        rows = conn.execute(query, params).all()
        unheld = [r[2] for r in rows if r[3] in _OPEN and not r[4]]
        if not unheld:
            return rows
        if time.monotonic() > deadline:
            raise TimeoutError(f"open jobs {unheld} stayed locked by another transaction")
        time.sleep(0.005)


def _mark(conn: Connection, ids: list[str], status: JobStatus, now: float) -> set[str]:
    if ids:
        values: dict[str, object] = {"status": status.value, "updated_at": now}
        if status is JobStatus.READY:
            values["next_run_at"] = now
        conn.execute(update(jobs).where(bulk.among(conn, jobs.c.id, ids)).values(values))
    return set(ids)


def _stage_milestones(
    conn: Connection, run_id: str, spec: RunSpec, stages: set[str], now: float
) -> bool:
    """Write the milestones of the item stages in `stages` that have settled; True if one of
    them has not."""
    # in the graph's order, as MemoryStore writes simultaneous milestones
    item_stages = [s for s, st in spec.stages.items() if s in stages and st.scope is Scope.ITEM]
    busy = False
    for name in item_stages:
        if _any_unsettled(conn, run_id, [name]):
            busy = True
            continue
        tally = RunCounts()
        for status, n in conn.execute(
            select(jobs.c.status, func.count())
            .where(jobs.c.run_id == run_id, jobs.c.stage == name)
            .group_by(jobs.c.status)
        ):
            tally.jobs_by_stage_status[(name, status)] = n
        milestones(conn, run_id, spec).stages_settled(tally, {name: spec.stages[name]}, now)
    return busy


def _any_unsettled(conn: Connection, run_id: str, stages: list[str]) -> bool:
    """EXISTS over the (run_id, stage, status) index: O(1) however large the run."""
    query = _unsettled_query(conn.dialect.name)
    return conn.execute(query, {"run_id": run_id, "stages": stages}).first() is not None


@functools.cache
def _unsettled_query(dialect: str) -> Select[Any]:
    unsettled = (JobStatus.PENDING.value, JobStatus.READY.value, JobStatus.RUNNING.value)
    return (
        select(jobs.c.id)
        .where(
            jobs.c.run_id == bindparam("run_id"),
            bulk.in_param(dialect, jobs.c.stage, "stages"),
            bulk.one_of(jobs.c.status, unsettled),
        )
        .limit(1)
    )


def advance_run(conn: Connection, run_id: str, spec: RunSpec, now: float) -> set[str]:
    """Start run-scope jobs once every item has settled; finish the run when all is done."""
    status = conn.execute(_RUN_STATUS, {"id": run_id}).scalar_one()
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
    """Stage -> (job id, status), in creation order; open jobs locked (see _lock_open)."""
    rows = _lock_open(conn, _locking_read(where), {})
    return {stage: (job_id, JobStatus(status)) for _, stage, job_id, status, _ in rows}


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
