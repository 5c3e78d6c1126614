"""SQLStore: the Store Protocol on SQLite or PostgreSQL, with MemoryStore's semantics.

Every method is one transaction. Writing transactions begin with BEGIN IMMEDIATE on SQLite
(engine.py), which serialises them across processes; on PostgreSQL they rely on row locks
(FOR UPDATE [SKIP LOCKED]), the run lock and advisory locks, as each module explains.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, select

from llm_batch_queue.errors import LeaseLost
from llm_batch_queue.jobs import (
    JSON,
    Attempt,
    AttemptResult,
    ClaimedJob,
    Item,
    ItemStatus,
    Job,
    Lease,
    NewItem,
    Notification,
    Outcome,
    Reservation,
    Run,
    RunCounts,
    RunStatus,
    Scope,
    StageSpec,
)
from llm_batch_queue.limits import Deny, ModelLimits
from llm_batch_queue.storable import check_new_run
from llm_batch_queue.store.base import (
    Claim,
    Completion,
    Failure,
    Finish,
    Leased,
    ModelState,
    Plan,
    Purge,
    Release,
    Used,
)
from llm_batch_queue.store.sql import (
    admin,
    claims,
    graph,
    ledger,
    outbox,
    outcomes,
    retention,
    schema,
    summary,
    wakeups,
)
from llm_batch_queue.store.sql.engine import WRITE, is_memory_sqlite, make_engine
from llm_batch_queue.store.sql.rows import (
    ITEM_COLUMNS,
    JOB_COLUMNS,
    stages_from_json,
    stages_to_json,
    to_attempt,
    to_item,
    to_job,
    to_run,
)
from llm_batch_queue.store.sql.tables import attempts, jobs, runs
from llm_batch_queue.store.sql.tables import items as items_table
from llm_batch_queue.summary import RunSummary
from llm_batch_queue.transitions import initial_status

ADMIN_TRIES = 40  # about 8 s of backing off while workers finish the jobs an admin action needs


class SQLStore:
    """A Store in a SQL database.

    `url_or_engine`: a SQLAlchemy URL (`sqlite:///path.db`, `sqlite://` for memory,
    `postgresql+psycopg://...`), a bare file path (SQLite), or an Engine (which stays yours:
    close() does not dispose it). `migrate=True` brings the schema to the newest revision first.
    """

    def __init__(self, url_or_engine: str | Path | Engine, *, migrate: bool = True) -> None:
        if isinstance(url_or_engine, Engine):
            self._engine, self._owns_engine = url_or_engine, False
            if url_or_engine.dialect.name == "sqlite":
                from llm_batch_queue.store.sql.engine import configure_sqlite

                configure_sqlite(url_or_engine)
        else:
            self._engine, self._owns_engine = make_engine(url_or_engine), True
        # an in-memory SQLite database is one shared connection: take turns within the process
        self._guard: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if is_memory_sqlite(self._engine) else contextlib.nullcontext()
        )
        self._specs: dict[str, graph.RunSpec] = {}
        if migrate:
            with self._guard:
                schema.upgrade(self._engine)

    @property
    def engine(self) -> Engine:
        return self._engine

    @contextlib.contextmanager
    def _tx(self, *, write: bool = False) -> Iterator[Connection]:
        with self._guard, self._engine.connect() as conn:
            if write:
                conn.execution_options(**{WRITE: True})
            with conn.begin():
                yield conn

    def _spec(self, conn: Connection, run_id: str) -> graph.RunSpec:
        spec = self._specs.get(run_id)
        if spec is None:  # immutable once the run exists, so any process may cache it
            row = conn.execute(select(runs.c.stages, runs.c.notify).where(runs.c.id == run_id))
            stages, notify = row.one()
            spec = self._specs[run_id] = graph.RunSpec(stages_from_json(stages), frozenset(notify))
        return spec

    # runs and items ------------------------------------------------------------------------
    def create_run(
        self,
        *,
        pipeline: str,
        name: str,
        stages: Mapping[str, StageSpec],
        items: Sequence[NewItem],
        meta: JSON,
        now: float,
        notify: Collection[str] = (),
    ) -> Run:
        check_new_run(name, meta, items)
        run_id = uuid.uuid4().hex
        spec = graph.RunSpec(dict(stages), frozenset(notify))
        item_rows = [_item_row(run_id, i, new) for i, new in enumerate(items)]
        # fair_key: the item's position (run-scope jobs: after every item), plus the pipeline's
        # virtual time once the transaction has read it (jobs.Job.fair_key)
        job_rows = [
            _job_row(run_id, pipeline, row["id"], stage, now, row["position"])
            for row in item_rows
            for stage in stages.values()
            if stage.scope is Scope.ITEM
        ]
        run_stages = [s for s in stages.values() if s.scope is Scope.RUN]
        job_rows += [_job_row(run_id, pipeline, None, s, now, len(item_rows)) for s in run_stages]
        for position, row in enumerate(job_rows):
            row["position"] = position
        with self._tx(write=True) as conn:
            base = claims.virtual_time(conn, pipeline, now)
            for row in job_rows:
                row["fair_key"] += base
            conn.execute(
                runs.insert().values(
                    id=run_id,
                    pipeline=pipeline,
                    name=name,
                    status=RunStatus.RUNNING.value,
                    meta=meta,
                    stages=stages_to_json(stages),
                    notify=sorted(spec.notify),
                    created_at=now,
                    round=1,
                )
            )
            if item_rows:
                conn.execute(items_table.insert(), item_rows)
            if job_rows:
                conn.execute(jobs.insert(), job_rows)
                wakeups.announce(conn, pipeline)
            graph.milestones(conn, run_id, spec).run_queued(len(items), now)
            if not items:
                graph.advance_run(conn, run_id, spec, now)
            self._specs[run_id] = spec
            return to_run(conn.execute(select(runs).where(runs.c.id == run_id)).one())

    def get_run(self, run_id: str) -> Run:
        with self._tx() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
        if row is None:
            raise KeyError(f"no run {run_id!r}")
        return to_run(row)

    def list_runs(self) -> list[Run]:
        with self._tx() as conn:
            rows = conn.execute(select(runs).order_by(runs.c.created_at, runs.c.id)).all()
        return [to_run(r) for r in rows]

    def items(self, run_id: str) -> list[Item]:
        with self._tx() as conn:
            rows = conn.execute(
                select(*ITEM_COLUMNS)
                .where(items_table.c.run_id == run_id)
                .order_by(items_table.c.position)
            ).all()
        return [to_item(r) for r in rows]

    def jobs(self, run_id: str) -> list[Job]:
        with self._tx() as conn:
            rows = conn.execute(
                select(*JOB_COLUMNS).where(jobs.c.run_id == run_id).order_by(jobs.c.position)
            ).all()
        return [to_job(r) for r in rows]

    def attempts(self, run_id: str) -> list[Attempt]:
        with self._tx() as conn:
            rows = conn.execute(
                select(attempts)
                .join(jobs, jobs.c.id == attempts.c.job_id)
                .where(jobs.c.run_id == run_id)
                .order_by(attempts.c.id)
            ).all()
        return [to_attempt(r) for r in rows]

    def counts(self, run_id: str) -> RunCounts:
        with self._tx() as conn:
            return graph.counts(conn, run_id)

    def run_summary(self, run_id: str) -> RunSummary:
        with self._tx() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
            if row is None:
                raise KeyError(f"no run {run_id!r}")
            return summary.run_summary(conn, to_run(row), self._spec(conn, run_id))

    def purge_finished_runs(self, retention_s: float, now: float) -> Purge:
        with self._tx(write=True) as conn:
            return retention.purge_finished(conn, retention_s, now)

    # admin actions -------------------------------------------------------------------------------
    def retry_item(
        self, run_id: str, item_key: str, now: float, from_stage: str | None = None
    ) -> Item:
        return self._admin(
            lambda conn: admin.retry_item(conn, self._spec, run_id, item_key, now, from_stage)
        )

    def skip_item(self, run_id: str, item_key: str, reason: str, now: float) -> Item:
        return self._admin(
            lambda conn: admin.skip_item(conn, self._spec, run_id, item_key, reason, now)
        )

    def _admin(self, action: Callable[[Connection], Item]) -> Item:
        """Run an admin action, again if a worker was finishing one of its jobs (admin.Busy)."""
        for attempt in itertools.count():
            try:
                with self._tx(write=True) as conn:
                    return action(conn)
            except admin.Busy:
                if attempt >= ADMIN_TRIES:
                    raise
                time.sleep(min(0.005 * 2**attempt, 0.25))
        raise AssertionError("unreachable")

    # claiming and finishing ------------------------------------------------------------------
    def claim(
        self,
        *,
        worker: str,
        now: float,
        limit: int,
        lease_s: float,
        stages: Collection[str] | None = None,
        pipeline: str | None = None,
    ) -> list[ClaimedJob]:
        return self.claim_work(
            worker=worker,
            now=now,
            limit=limit,
            lease_s=lease_s,
            plan=lambda _job, _state: None,
            stages=stages,
            pipeline=pipeline,
        ).jobs

    def claim_work(
        self,
        *,
        worker: str,
        now: float,
        limit: int,
        lease_s: float,
        plan: Plan,
        stages: Collection[str] | None = None,
        pipeline: str | None = None,
    ) -> Claim:
        with self._tx(write=True) as conn:
            return claims.claim_work(
                conn,
                self._spec,
                worker=worker,
                now=now,
                limit=limit,
                lease_s=lease_s,
                plan=plan,
                stages=stages,
                pipeline=pipeline,
            )

    def next_due(
        self, stages: Collection[str] | None = None, pipeline: str | None = None
    ) -> float | None:
        with self._tx() as conn:
            return claims.next_due(conn, stages, pipeline)

    def leased(self, pipeline: str | None = None) -> Leased:
        with self._tx() as conn:
            return claims.leased(conn, pipeline)

    def heartbeat(self, lease: Lease, now: float, lease_s: float) -> Lease:
        (renewed,) = self.heartbeat_all([lease], now, lease_s)
        if renewed is None:
            raise LeaseLost(f"job {lease.job_id} is no longer leased to this worker")
        return renewed

    def heartbeat_all(
        self, leases: Sequence[Lease], now: float, lease_s: float
    ) -> list[Lease | None]:
        with self._tx(write=True) as conn:
            return claims.heartbeat_all(conn, leases, now, lease_s)

    def finish(self, batch: Sequence[Finish], now: float) -> list[bool]:
        if not batch:
            return []
        with self._tx(write=True) as conn:
            return outcomes.finish(conn, self._spec, batch, now)

    def _finish_one(self, done: Finish, now: float) -> None:
        if not self.finish([done], now)[0]:
            raise LeaseLost(f"job {done.lease.job_id} is no longer leased to this worker")

    def complete(self, lease: Lease, result: AttemptResult, output: JSON, now: float) -> None:
        self._finish_one(Completion(lease, result, output), now)

    def fail(self, lease: Lease, result: AttemptResult, outcome: Outcome, now: float) -> None:
        self._finish_one(Failure(lease, result, outcome), now)

    def release(self, lease: Lease, at: float, reason: str, now: float) -> None:
        self._finish_one(Release(lease, at, reason), now)

    # rate ledger --------------------------------------------------------------------------------
    def reserve(
        self, model: str, limits: ModelLimits, tokens: int, now: float
    ) -> Reservation | Deny:
        with self._tx(write=True) as conn:
            return ledger.reserve(conn, model, limits, tokens, now)

    def reconcile(
        self,
        reservation: Reservation,
        tokens: int,
        sent_at: float | None = None,
        *,
        sent: bool = True,
    ) -> None:
        with self._tx(write=True) as conn:
            ledger.reconcile(conn, [Used(reservation, tokens, sent_at, sent)])

    def block_model(self, model: str, until: float, reason: str) -> None:
        with self._tx(write=True) as conn:
            ledger.block(conn, model, until, reason)

    def model_state(self, model: str, now: float) -> ModelState:
        with self._tx() as conn:
            return ledger.state(conn, model, now)

    # outbox -------------------------------------------------------------------------------------
    def pending_notifications(self, now: float, limit: int = 50) -> list[Notification]:
        with self._tx() as conn:
            return outbox.pending(conn, now, limit)

    def claim_notifications(
        self, now: float, limit: int = 50, hold_s: float = 300.0, *, idempotent: bool = False
    ) -> list[Notification]:
        with self._tx(write=True) as conn:
            return outbox.claim(conn, now, limit, hold_s, idempotent)

    def mark_notification(
        self,
        notification_id: int,
        *,
        sent: bool,
        now: float,
        error: str | None = None,
        retry_at: float | None = None,
        in_doubt: bool = False,
        provider_id: str | None = None,
    ) -> bool:
        with self._tx(write=True) as conn:
            return outbox.mark(
                conn,
                notification_id,
                sent=sent,
                now=now,
                error=error,
                retry_at=retry_at,
                in_doubt=in_doubt,
                provider_id=provider_id,
            )

    def resolve_notification(
        self, notification_id: int, *, resend: bool, now: float
    ) -> Notification:
        with self._tx(write=True) as conn:
            return outbox.resolve(conn, notification_id, resend=resend, now=now)

    def notifications(self, run_id: str) -> list[Notification]:
        with self._tx() as conn:
            return outbox.for_run(conn, run_id)

    def close(self) -> None:
        if self._owns_engine:
            self._engine.dispose()


def _item_row(run_id: str, position: int, new: NewItem) -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "run_id": run_id,
        "position": position,
        "key": new.key,
        "status": ItemStatus.QUEUED.value,
        "payload": new.payload,
        "outputs": {},
        "error": None,
        "failures": 0,
    }


def _job_row(
    run_id: str, pipeline: str, item_id: str | None, spec: StageSpec, now: float, fair_key: float
) -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "run_id": run_id,
        "pipeline": pipeline,
        "item_id": item_id,
        "stage": spec.name,
        "status": initial_status(spec).value,
        "priority": spec.priority,
        "fair_key": fair_key,
        "attempts": 0,
        "max_attempts": spec.max_attempts,
        "next_run_at": now,
        "model_index": 0,
        "model_failures": 0,
        "last_error": None,
        "output": None,
        "lease_token": None,
        "lease_expires_at": None,
        "leased_by": None,
        "created_at": now,
        "updated_at": now,
    }
