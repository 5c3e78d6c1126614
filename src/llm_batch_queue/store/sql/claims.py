"""Claiming jobs under a lease, reclaiming expired leases, heartbeats.

On PostgreSQL, candidates are taken with FOR UPDATE SKIP LOCKED, so concurrent claimers get
disjoint jobs without waiting for each other (D-2). Expired leases are reclaimed by the same
query (no separate sweeper, D-5): the expiry is counted as an attempt, and a job that reaches
max_attempts that way fails and settles its item and run in this transaction (D-7).

Candidates go by priority (highest first), then fair_key (start-time fair queueing: concurrent
runs take turns, see jobs.Job.fair_key and virtual_time), then due time and id.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Insert,
    Integer,
    Select,
    Update,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)

from llm_batch_queue.errors import LeaseLost
from llm_batch_queue.jobs import (
    AttemptResult,
    ClaimedJob,
    ItemStatus,
    Job,
    JobStatus,
    Lease,
    Reservation,
)
from llm_batch_queue.limits import Admission, Deny
from llm_batch_queue.store.base import (
    Booking,
    Claim,
    Denied,
    Leased,
    ModelState,
    Plan,
    Postpone,
)
from llm_batch_queue.store.memory import LOOKAHEAD
from llm_batch_queue.store.sql import bulk, graph, ledger
from llm_batch_queue.store.sql.locks import lock_run
from llm_batch_queue.store.sql.rows import (
    ITEM_COLUMNS,
    ITEM_STATUS,
    OPEN_JOB_COLUMNS,
    AnyRow,
    attempt_values,
    to_item,
    to_job,
    to_run,
)
from llm_batch_queue.store.sql.tables import attempts, items, jobs, runs

EXPIRED_MESSAGE = "lease expired: the worker died or stalled"  # as MemoryStore writes it
NO_LEASE: dict[str, Any] = {"lease_token": None, "lease_expires_at": None, "leased_by": None}

SpecOf = Callable[[Connection, str], graph.RunSpec]


def claim_work(
    conn: Connection,
    spec_of: SpecOf,
    *,
    worker: str,
    now: float,
    limit: int,
    lease_s: float,
    plan: Plan,
    stages: Collection[str] | None,
    pipeline: str | None = None,
    admission: Admission | None = None,
) -> Claim:
    claim = Claim()
    bookings = ledger.Bookings(conn, now, admission)
    blocks = ledger.states(conn)
    # after an expiry failed a job this transaction holds a run lock: from then on it takes a
    # model lock only if it is free, never waiting with a run lock held (lock order: outcomes.py)
    holds_run = False
    locked: set[str] = set()
    # jobs this call has looked at or released itself: MemoryStore picks its candidates once,
    # so neither is claimed again in the same call
    seen: set[str] = set()
    budget = limit  # candidates to look at: more after a denial that leaves room to backfill
    spent: set[str] = set()  # models denied with no room left: their jobs stay as they are
    considered = 0
    first_round = True
    while len(claim.jobs) < limit and considered < budget:
        rows = _candidate_rows(conn, now, stages, pipeline, seen, budget - considered)
        if not rows:
            break
        found: list[tuple[Job, bool]] = []
        for row in rows:
            seen.add(row.id)
            reclaimed = row.status == JobStatus.RUNNING.value
            job = to_job(row) if reclaimed else to_job(row, JobStatus.RUNNING)
            if reclaimed:
                expired = _expire(conn, spec_of, row, now)
                if expired is None:  # its run is busy: leave it to the next claim
                    continue
                job, released = expired
                if job.status is JobStatus.FAILED:
                    holds_run = True
                    seen |= released
                    break  # the rest of this batch may have been cancelled: query again
            found.append((job, reclaimed))
        candidates = _candidates_in_context(conn, found, worker, now, lease_s)

        def state(model: str) -> ModelState:
            until, reason = blocks.get(model, (0.0, ""))
            return ModelState(model, until, reason) if until > now else ModelState(model, 0.0, None)

        wanted = [plan(c, state) for c in candidates]
        first_models = sorted({w.model for w in wanted if isinstance(w, Booking)} - locked)
        for model in first_models:
            # in name order, and only in the first round (later ones add locks only if free):
            # no two claims wait for each other
            if ledger.lock_model(conn, model, wait=first_round and not holds_run):
                locked.add(model)
        first_round = False
        for candidate, want in zip(candidates, wanted, strict=True):
            if len(claim.jobs) >= limit:
                break  # the rest stay as they were
            considered += 1
            if isinstance(want, Booking) and want.model in spent:
                outcome: Reservation | Denied | Postpone | _Skip | None = _Skip()
            else:
                outcome = _book(conn, candidate, want, plan, state, bookings, blocks, locked, now)
            if isinstance(outcome, Denied):
                claim.denied.append(outcome)
                if bookings.quotas[outcome.model].can_backfill:
                    budget = max(budget, limit + LOOKAHEAD)
                else:
                    spent.add(outcome.model)
            if isinstance(outcome, Denied | Postpone | _Skip):
                _unclaimed(conn, candidate, outcome, now)
                continue
            c = candidate
            claim.jobs.append(ClaimedJob(c.job, c.lease, c.run, c.item, c.reclaimed, outcome))
    _write_leases(conn, claim.jobs, worker, now)
    bookings.write()
    return claim


class _Skip:
    """Left as it was, for a later claim: its fallback model's lock is held elsewhere, or its
    model was already denied in this claim with no room left (MemoryStore's _Left)."""


def _book(
    conn: Connection,
    candidate: ClaimedJob,
    want: Booking | Postpone | None,
    plan: Plan,
    state: Callable[[str], ModelState],
    bookings: ledger.Bookings,
    blocks: dict[str, tuple[float, str]],
    locked: set[str],
    now: float,
) -> Reservation | Denied | Postpone | _Skip | None:
    """Book what the plan wants; a spent day parks the model and asks the plan again."""
    while isinstance(want, Booking):
        if want.model not in locked:
            # a fallback chosen after the name-ordered locks were taken: only if free now
            if not ledger.lock_model(conn, want.model, wait=False):
                return _Skip()
            locked.add(want.model)
        verdict = bookings.book(want.model, want.limits, want.tokens)
        if not isinstance(verdict, Deny):
            return verdict
        if verdict.reason != "rpd":
            return Denied(candidate.job, want.model, verdict)
        ledger.block(conn, want.model, verdict.retry_at, "day")
        blocks[want.model] = (verdict.retry_at, "day")
        want = plan(candidate, state)
    return want


def _candidates_in_context(
    conn: Connection, found: list[tuple[Job, bool]], worker: str, now: float, lease_s: float
) -> list[ClaimedJob]:
    """The jobs (already marked RUNNING) as they would be handed out: leased, with their run
    and item (two reads)."""
    item_ids = [job.item_id for job, _ in found if job.item_id is not None]
    dialect = conn.dialect.name
    # .all(): one fetch of every row, where iterating fetches them one at a time
    item_rows = conn.execute(_items_by_ids(dialect), {"ids": item_ids}).all() if item_ids else []
    # as they are once claimed: a queued item starts running with its job
    queued, running = ItemStatus.QUEUED.value, ItemStatus.RUNNING
    by_item = {
        row[0]: to_item(row, running if row[ITEM_STATUS] == queued else None) for row in item_rows
    }
    run_ids = list({job.run_id for job, _ in found})
    by_run = (
        {row.id: to_run(row) for row in conn.execute(_runs_by_ids(dialect), {"ids": run_ids})}
        if run_ids
        else {}
    )
    out = []
    # 32 hex digits each: random per claim, numbered within it (one urandom call per job
    # cost more than the rest of the lease)
    tokens = _lease_tokens(len(found))
    for (job, reclaimed), token in zip(found, tokens, strict=True):
        item = by_item.get(job.item_id) if job.item_id is not None else None
        out.append(
            ClaimedJob(
                job,
                Lease(job.id, token, now + lease_s),
                by_run[job.run_id],
                item,
                reclaimed,
            )
        )
    return out


def _lease_tokens(n: int) -> list[str]:
    prefix = os.urandom(12).hex()
    return [f"{prefix}{i:08x}" for i in range(n)]


def _unclaimed(
    conn: Connection, candidate: ClaimedJob, why: Denied | Postpone | _Skip, now: float
) -> None:
    """A job not handed out stays as it was, except: a postponed one waits until then, and a
    reclaimed one (whose expiry was counted) is READY again."""
    job = candidate.job
    values: dict[str, Any] = {"last_error": job.last_error}
    if isinstance(why, Postpone):
        values = {"next_run_at": why.at, "last_error": why.reason}
    elif not candidate.reclaimed:
        return
    conn.execute(
        update(jobs)
        .where(jobs.c.id == job.id)
        .values(
            status=JobStatus.READY.value,
            attempts=job.attempts,
            updated_at=now,
            **NO_LEASE,
            **values,
        )
    )


def _write_leases(conn: Connection, claimed: list[ClaimedJob], worker: str, now: float) -> None:
    if not claimed:
        return
    leases = [
        {
            "id": c.job.id,
            "attempts": c.job.attempts,
            "last_error": c.job.last_error,
            "lease_token": c.lease.token,
            "lease_expires_at": c.lease.expires_at,
        }
        for c in claimed
    ]
    running = {"status": JobStatus.RUNNING.value, "leased_by": worker, "updated_at": now}
    bulk.update_rows(conn, jobs, leases, constants=running)
    item_ids = [c.job.item_id for c in claimed if c.job.item_id is not None]
    if item_ids:
        # SKIP LOCKED: this transaction holds model locks, which a finish holding an item row
        # may be waiting for; such an item is being settled, so it is no longer queued anyway
        conn.execute(_items_running(conn.dialect.name), {"ids": item_ids})


@functools.cache
def _items_by_ids(dialect: str) -> Select[Any]:
    return select(*ITEM_COLUMNS).where(bulk.in_param(dialect, items.c.id, "ids"))


@functools.cache
def _runs_by_ids(dialect: str) -> Select[Any]:
    return select(runs).where(bulk.in_param(dialect, runs.c.id, "ids"))


@functools.cache
def _items_running(dialect: str) -> Update:
    queued = (
        select(items.c.id)
        .where(bulk.in_param(dialect, items.c.id, "ids"), items.c.status == ItemStatus.QUEUED.value)
        .with_for_update(skip_locked=True)
    )
    return (
        update(items)
        .where(items.c.id.in_(queued.scalar_subquery()))
        .values(status=ItemStatus.RUNNING.value)
    )


def _candidate_rows(
    conn: Connection,
    now: float,
    stages: Collection[str] | None,
    pipeline: str | None,
    seen: set[str],
    n: int,
) -> list[AnyRow]:
    """The first `n` claimable jobs in claim order: due READY jobs and expired leases, each
    read by an index scan that stops at `n` (ix_lbq_jobs_claim_order; the RUNNING jobs are few)
    rather than one query whose OR would sort the whole queue, then merged."""
    params = {"now": now, "n": n, "stages": list(stages or ()), "pipeline": pipeline}
    params["seen"] = list(seen)
    shape = (stages is not None, pipeline is not None, bool(seen))
    found: list[AnyRow] = []
    for status in (JobStatus.READY, JobStatus.RUNNING):
        query = _candidates_query(conn.dialect.name, status, *shape)
        found += conn.execute(query, params).all()
    found.sort(key=lambda r: (-r.priority, r.fair_key, r.next_run_at, r.id))
    return found[:n]  # the rest stay as they were (locked until this transaction ends)


@functools.cache
def _candidates_query(
    dialect: str, status: JobStatus, by_stage: bool, by_pipeline: bool, skip_seen: bool
) -> Select[Any]:
    due = jobs.c.next_run_at if status is JobStatus.READY else jobs.c.lease_expires_at
    query = (
        select(*OPEN_JOB_COLUMNS, jobs.c.lease_expires_at)
        .where(jobs.c.status == status.value, due <= bindparam("now"))
        .order_by(jobs.c.priority.desc(), jobs.c.fair_key, jobs.c.next_run_at, jobs.c.id)
        .limit(bindparam("n", type_=Integer))
        .with_for_update(skip_locked=True)
    )
    if by_stage:
        query = query.where(bulk.in_param(dialect, jobs.c.stage, "stages"))
    if by_pipeline:
        query = query.where(jobs.c.pipeline == bindparam("pipeline"))
    if skip_seen:
        query = query.where(bulk.not_in_param(dialect, jobs.c.id, "seen"))
    return query


def virtual_time(conn: Connection, pipeline: str, now: float) -> float:
    """Where the pipeline's claim order stands: the smallest fair_key among its jobs ready to
    run at `now`, or 0 if there are none. A new run's jobs are keyed from here (jobs.Job)."""
    value = conn.execute(
        select(func.min(jobs.c.fair_key)).where(
            jobs.c.status == JobStatus.READY.value,
            jobs.c.next_run_at <= now,
            jobs.c.pipeline == pipeline,
        )
    ).scalar()
    return 0.0 if value is None else float(value)


def _expire(
    conn: Connection, spec_of: SpecOf, row: AnyRow, now: float
) -> tuple[Job, set[str]] | None:
    """Count the dead owner's attempt, so a job that kills its worker every time ends failed
    instead of looping forever. None if the job would fail but its run is busy."""
    job = to_job(row)
    job = replace(job, attempts=job.attempts + 1, last_error=EXPIRED_MESSAGE)
    fails = job.attempts >= job.max_attempts
    # failing settles the item and run: take their locks without waiting, since we already
    # hold other candidates' locks that a settling transaction may be waiting for
    if fails and not (
        lock_run(conn, job.run_id, wait=False) and _open_jobs_free(conn, job.run_id, job.item_id)
    ):
        return None
    result = AttemptResult(
        started_at=row.lease_expires_at,
        finished_at=now,
        error_kind="lease_expired",
        error_message=EXPIRED_MESSAGE,
    )
    record(conn, job, result)
    if not fails:
        return job, set()
    job = replace(job, status=JobStatus.FAILED)
    conn.execute(
        update(jobs)
        .where(jobs.c.id == job.id)
        .values(
            status=job.status.value,
            attempts=job.attempts,
            last_error=job.last_error,
            updated_at=now,
            **NO_LEASE,
        )
    )
    if job.item_id is not None:
        conn.execute(
            update(items)
            .where(items.c.id == job.item_id)
            .values(error=f"{job.stage}: {EXPIRED_MESSAGE}")
        )
    return job, graph.after_settle(
        conn, job.run_id, job.item_id, spec_of(conn, job.run_id), now, (job.stage,)
    )


def _open_jobs_free(conn: Connection, run_id: str, item_id: str | None) -> bool:
    """Lock the open jobs settlement may change; False if another claimer holds one."""
    scope: ColumnElement[bool] = jobs.c.item_id.is_(None)
    if item_id is not None:
        scope = or_(scope, jobs.c.item_id == item_id)
    where = and_(
        jobs.c.run_id == run_id,
        scope,
        jobs.c.status.in_([JobStatus.PENDING.value, JobStatus.READY.value]),
    )
    locked = conn.execute(select(jobs.c.id).where(where).with_for_update(skip_locked=True)).all()
    return len(locked) == conn.execute(select(func.count()).where(where)).scalar_one()


def record(conn: Connection, job: Job, result: AttemptResult) -> None:
    record_attempts(conn, [attempt_values(job.id, job.stage, job.item_id, result)])


def record_attempts(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """INSERT attempt rows (rows.attempt_values) in one statement, each with its item's key
    (looked up by the statement itself, so no read of the items comes first)."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        conn.execute(_attempts_from_json(), {"rows": rows})
        return
    conn.execute(_attempts_values(), [{f"b_{n}": v for n, v in row.items()} for row in rows])


_ATTEMPT_FIELDS = tuple(c.name for c in attempts.c if c.name not in ("id", "item_key"))


@functools.cache
def _attempts_from_json() -> Insert:
    v = bulk.recordset(
        *((n, attempts.c[n].type) for n in _ATTEMPT_FIELDS), ("item_id", items.c.id.type)
    )
    key = select(items.c.key).where(items.c.id == v.c.item_id).scalar_subquery()
    values = select(*(v.c[n] for n in _ATTEMPT_FIELDS), key)
    return insert(attempts).from_select([*_ATTEMPT_FIELDS, "item_key"], values)


@functools.cache
def _attempts_values() -> Insert:
    key = select(items.c.key).where(items.c.id == bindparam("b_item_id")).scalar_subquery()
    binds: dict[str, Any] = {n: bindparam(f"b_{n}") for n in _ATTEMPT_FIELDS}
    return insert(attempts).values({**binds, "item_key": key})


def take(conn: Connection, lease: Lease) -> Job:
    """Lock the job if the caller still holds its lease; otherwise LeaseLost, nothing changed."""
    row = conn.execute(
        select(*OPEN_JOB_COLUMNS)
        .where(
            jobs.c.id == lease.job_id,
            jobs.c.status == JobStatus.RUNNING.value,
            jobs.c.lease_token == lease.token,
        )
        .with_for_update()
    ).first()
    if row is None:
        raise LeaseLost(f"job {lease.job_id} is no longer leased to this worker")
    return to_job(row)


def leased_update(conn: Connection, lease: Lease, **values: Any) -> None:
    """UPDATE the job only while `lease` holds it; LeaseLost (and nothing written) otherwise."""
    done = conn.execute(
        update(jobs)
        .where(
            jobs.c.id == lease.job_id,
            jobs.c.status == JobStatus.RUNNING.value,
            jobs.c.lease_token == lease.token,
        )
        .values(**values)
    )
    if done.rowcount == 0:
        raise LeaseLost(f"job {lease.job_id} is no longer leased to this worker")


def heartbeat(conn: Connection, lease: Lease, now: float, lease_s: float) -> Lease:
    renewed = replace(lease, expires_at=now + lease_s)
    leased_update(conn, lease, lease_expires_at=renewed.expires_at, updated_at=now)
    return renewed


def heartbeat_all(
    conn: Connection, leases: Sequence[Lease], now: float, lease_s: float
) -> list[Lease | None]:
    """Renew every lease still held, in two statements whatever their number."""
    if not leases:
        return []
    held = {
        (job_id, token)
        for job_id, token in conn.execute(
            select(jobs.c.id, jobs.c.lease_token)
            .where(
                bulk.among(conn, jobs.c.id, sorted({lease.job_id for lease in leases})),
                jobs.c.status == JobStatus.RUNNING.value,
            )
            .order_by(jobs.c.id)
            .with_for_update()
        )
    }
    renewed = [
        replace(lease, expires_at=now + lease_s) if (lease.job_id, lease.token) in held else None
        for lease in leases
    ]
    ids = [lease.job_id for lease in renewed if lease is not None]
    if ids:
        conn.execute(
            update(jobs)
            .where(bulk.among(conn, jobs.c.id, ids))
            .values(lease_expires_at=now + lease_s, updated_at=now)
        )
    return renewed


def next_due(
    conn: Connection, stages: Collection[str] | None, pipeline: str | None = None
) -> float | None:
    """The earliest READY job's due time or RUNNING job's lease expiry: two index lookups
    (status, next_run_at) and (status, lease_expires_at), not a scan of the queue."""
    found = []
    for status, column in (
        (JobStatus.READY, jobs.c.next_run_at),
        (JobStatus.RUNNING, jobs.c.lease_expires_at),
    ):
        query = select(func.min(column)).where(jobs.c.status == status.value)
        if stages is not None:
            query = query.where(jobs.c.stage.in_(list(stages)))
        if pipeline is not None:
            query = query.where(jobs.c.pipeline == pipeline)
        value = conn.execute(query).scalar()
        if value is not None:
            found.append(float(value))
    return min(found, default=None)


def leased(conn: Connection, pipeline: str | None) -> Leased:
    """Over the running jobs only (the lease expiry index's rows), however large the queue."""
    query = select(func.count(), func.min(jobs.c.lease_expires_at)).where(
        jobs.c.status == JobStatus.RUNNING.value
    )
    if pipeline is not None:
        query = query.where(jobs.c.pipeline == pipeline)
    count, first = conn.execute(query).one()
    return Leased(count, None if first is None else float(first))
