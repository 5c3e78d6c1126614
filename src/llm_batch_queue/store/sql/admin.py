"""Admin actions in SQL: retry and skip an item, with MemoryStore's semantics and the rules of
store/admin.py. Each is one transaction.

Locks are taken in the order complete and fail take them (outcomes.py), so an admin action cannot
deadlock with dispatchers: first the RUNNING jobs it will change (as take() locks the job being
finished), then the run row (locks.lock_run), then the open jobs (as graph._load does). A job
claimed between the first step and the last is RUNNING but not yet locked by us. Waiting for it
could deadlock — its worker may be finishing it, holding its row and waiting for the run lock we
hold — so it is taken only if free (SKIP LOCKED); otherwise the action raises Busy, which rolls the
transaction back, and SQLStore tries again. On SQLite, BEGIN IMMEDIATE serialises every writer and
none of this arises.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Connection, or_, select, update

from llm_batch_queue.jobs import Item, ItemStatus, JobStatus, RunStatus
from llm_batch_queue.store.admin import (
    SKIPPABLE,
    not_retryable,
    not_skippable,
    purged,
    rerun_from,
    skip_note,
)
from llm_batch_queue.store.sql import graph, wakeups
from llm_batch_queue.store.sql.claims import NO_LEASE, SpecOf
from llm_batch_queue.store.sql.locks import lock_run
from llm_batch_queue.store.sql.rows import ITEM_COLUMNS, to_item
from llm_batch_queue.store.sql.tables import items, jobs, runs

_OPEN = (JobStatus.PENDING.value, JobStatus.READY.value)
_UNSETTLED = (*_OPEN, JobStatus.RUNNING.value)
_GAVE_UP = (JobStatus.FAILED.value, JobStatus.CANCELLED.value)


class Busy(RuntimeError):
    """A job the action must change is being finished by its worker: roll back, try again."""


def retry_item(
    conn: Connection,
    spec_of: SpecOf,
    run_id: str,
    item_key: str,
    now: float,
    from_stage: str | None = None,
) -> Item:
    item_id = _find(conn, run_id, item_key)
    spec = spec_of(conn, run_id)
    again = rerun_from(spec.stages, from_stage)
    run_scope = (jobs.c.run_id == run_id) & jobs.c.item_id.is_(None)
    _lock(conn, run_id, or_(jobs.c.item_id == item_id, run_scope))
    item = _item(conn, item_id)
    if item.status is not ItemStatus.NEEDS_REUPLOAD:
        raise ValueError(not_retryable(item))
    status, round_, purged_at = conn.execute(
        select(runs.c.status, runs.c.round, runs.c.purged_at).where(runs.c.id == run_id)
    ).one()
    if purged_at is not None:
        raise ValueError(purged(run_id))
    if status != RunStatus.RUNNING.value:  # reopen: a new round of milestones
        conn.execute(
            update(runs)
            .where(runs.c.id == run_id)
            .values(status=RunStatus.RUNNING.value, finished_at=None, round=round_ + 1)
        )
    fresh: dict[str, Any] = {
        "status": JobStatus.PENDING.value,
        "attempts": 0,
        "model_index": 0,
        "model_failures": 0,
        "last_error": None,
        "next_run_at": now,
        "output": None,
        "updated_at": now,
        **NO_LEASE,
    }
    restart: ColumnElement[bool] = jobs.c.status.in_(_GAVE_UP)
    if again:
        restart = or_(restart, jobs.c.stage.in_(sorted(again)))
    conn.execute(update(jobs).where(jobs.c.item_id == item_id, restart).values(fresh))
    # the run stages run again once every item has settled; one in flight loses its lease
    conn.execute(update(jobs).where(run_scope).values(fresh))
    status_now = graph.restart_item(conn, item_id, spec, now)
    pipeline = conn.execute(select(runs.c.pipeline).where(runs.c.id == run_id)).scalar_one()
    wakeups.announce(conn, pipeline)
    kept = {stage: out for stage, out in item.outputs.items() if stage not in again}
    conn.execute(
        update(items)
        .where(items.c.id == item_id)
        .values(status=status_now.value, error=None, outputs=kept)
    )
    return _item(conn, item_id)


def skip_item(
    conn: Connection, spec_of: SpecOf, run_id: str, item_key: str, reason: str, now: float
) -> Item:
    item_id = _find(conn, run_id, item_key)
    spec = spec_of(conn, run_id)
    _lock(conn, run_id, jobs.c.item_id == item_id)
    item = _item(conn, item_id)
    if item.status not in SKIPPABLE:
        raise ValueError(not_skippable(item))
    note = skip_note(reason)
    open_jobs = conn.execute(
        select(jobs.c.id, jobs.c.stage).where(
            jobs.c.item_id == item_id, jobs.c.status.in_(_UNSETTLED)
        )
    ).all()
    if open_jobs:
        # clearing the lease makes a running job's worker get LeaseLost, changing nothing (D-10)
        conn.execute(
            update(jobs)
            .where(jobs.c.id.in_([job_id for job_id, _ in open_jobs]))
            .values(status=JobStatus.CANCELLED.value, last_error=note, updated_at=now, **NO_LEASE)
        )
    conn.execute(update(items).where(items.c.id == item_id).values(error=note))
    graph.after_settle(conn, run_id, item_id, spec, now, {stage for _, stage in open_jobs})
    return _item(conn, item_id)


def _find(conn: Connection, run_id: str, item_key: str) -> str:
    if conn.execute(select(runs.c.id).where(runs.c.id == run_id)).first() is None:
        raise KeyError(f"no run {run_id!r}")
    item_id: str | None = conn.execute(
        select(items.c.id).where(items.c.run_id == run_id, items.c.key == item_key)
    ).scalar()
    if item_id is None:
        raise KeyError(f"run {run_id} has no item {item_key!r}")
    return item_id


def _item(conn: Connection, item_id: str) -> Item:
    return to_item(conn.execute(select(*ITEM_COLUMNS).where(items.c.id == item_id)).one())


def _lock(conn: Connection, run_id: str, scope: ColumnElement[bool]) -> None:
    """Lock the run and every unsettled job in `scope`, in the dispatchers' order (module doc)."""
    running = JobStatus.RUNNING.value
    held = set(
        conn.execute(
            select(jobs.c.id)
            .where(scope, jobs.c.status == running)
            .order_by(jobs.c.id)
            .with_for_update()
        ).scalars()
    )
    lock_run(conn, run_id)
    conn.execute(
        select(jobs.c.id)
        .where(scope, jobs.c.status.in_(_OPEN))
        .order_by(jobs.c.id)
        .with_for_update()
    ).all()
    late = list(
        conn.execute(
            select(jobs.c.id).where(scope, jobs.c.status == running, jobs.c.id.not_in(held))
        ).scalars()
    )
    if late:  # claimed meanwhile: take them only if nobody is finishing them right now
        got = conn.execute(
            select(jobs.c.id).where(jobs.c.id.in_(late)).with_for_update(skip_locked=True)
        ).all()
        if len(got) != len(late):
            raise Busy(f"run {run_id}: a job is being finished right now")
