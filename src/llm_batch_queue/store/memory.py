"""A real Store in process memory: for tests, notebooks and single-process scripts."""

from __future__ import annotations

import copy
import itertools
import json
import threading
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace

from llm_batch_queue import transitions
from llm_batch_queue.errors import LeaseLost
from llm_batch_queue.jobs import (
    JSON,
    Attempt,
    AttemptResult,
    ClaimedJob,
    GiveUp,
    Item,
    ItemStatus,
    Job,
    JobStatus,
    Lease,
    NewItem,
    Notification,
    NotificationStatus,
    Outcome,
    Reservation,
    Run,
    RunCounts,
    RunStatus,
    Scope,
    StageSpec,
)
from llm_batch_queue.limits import (
    Deny,
    ModelLimits,
    Quota,
    Usage,
    WindowEntry,
    admit,
    day_start,
    slot_time,
    window_slot,
)
from llm_batch_queue.storable import check_new_run
from llm_batch_queue.store._ledger import LedgerChange, booked, reconciled
from llm_batch_queue.store._memory_tables import ItemTable, JobTable
from llm_batch_queue.store.admin import (
    SKIPPABLE,
    not_retryable,
    not_skippable,
    purged,
    rerun_from,
    skip_note,
)
from llm_batch_queue.store.base import (
    Booking,
    Claim,
    Completion,
    Denied,
    Failure,
    Finish,
    Leased,
    ModelState,
    Plan,
    Postpone,
    Purge,
    Used,
)
from llm_batch_queue.store.milestones import RUN_FINISHED, Milestones, final_key
from llm_batch_queue.store.outbox import IN_DOUBT_ERROR, check_resolvable
from llm_batch_queue.summary import RunSummary, group_attempts, summarize

IN_FLIGHT_TTL_S = 900.0  # a reservation never reconciled (crashed worker) stops counting after this
KEEP_DAYS_S = 2 * 86400.0  # day counters older than this never matter again


class _Left:
    """A claim's verdict for a job it leaves as it was (its model has no room left)."""


_LEFT = _Left()
LOOKAHEAD = 16  # candidates a claim looks at beyond its limit, for backfilling behind a denial


class MemoryStore:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._runs: dict[str, Run] = {}
        self._stages: dict[str, dict[str, StageSpec]] = {}
        self._items = ItemTable()
        self._jobs = JobTable()
        self._leases: dict[str, Lease] = {}
        self._attempts: list[Attempt] = []
        # the rate ledger: (model, slot) -> [requests, tokens, open requests]; (model, day) -> n
        self._slots: dict[tuple[str, int], list[int]] = {}
        self._days: dict[tuple[str, float], int] = {}
        self._blocks: dict[str, ModelState] = {}
        self._outbox: dict[int, Notification] = {}
        self._notify_kinds: dict[str, frozenset[str]] = {}
        self._ids = itertools.count(1)

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
        with self._lock:
            base = self._virtual_time(pipeline, now)  # before this run's jobs exist
            run = Run(uuid.uuid4().hex, pipeline, name, RunStatus.RUNNING, meta, now, None)
            self._runs[run.id] = run
            self._stages[run.id] = dict(stages)
            self._notify_kinds[run.id] = frozenset(notify)
            for position, new in enumerate(items):
                item = Item(
                    uuid.uuid4().hex,
                    run.id,
                    new.key,
                    ItemStatus.QUEUED,
                    copy.deepcopy(new.payload),
                    {},
                    None,
                    0,
                )
                self._items[item.id] = item
                for spec in stages.values():
                    if spec.scope is Scope.ITEM:
                        self._new_job(run.id, item.id, spec, now, base + position)
            for spec in stages.values():
                if spec.scope is Scope.RUN:
                    self._new_job(run.id, None, spec, now, base + len(items))
            self._milestones(run.id).run_queued(len(items), now)
            if not items:
                self._advance_run(run.id, now)
            return self._runs[run.id]  # a run with nothing to do is finished already

    def _new_job(
        self, run_id: str, item_id: str | None, spec: StageSpec, now: float, fair_key: float
    ) -> None:
        job = Job(
            uuid.uuid4().hex,
            run_id,
            item_id,
            spec.name,
            transitions.initial_status(spec),
            spec.priority,
            0,
            spec.max_attempts,
            now,
            0,
            None,
            fair_key=fair_key,
        )
        self._jobs[job.id] = job

    def _virtual_time(self, pipeline: str, now: float) -> float:
        """Where the pipeline's claim order stands: the smallest fair_key among its jobs ready to
        run at `now`, or 0 if there are none. A new run's jobs are keyed from here (jobs.Job)."""
        keys = [
            j.fair_key
            for j in self._jobs.open_jobs()
            if j.status is JobStatus.READY
            and j.next_run_at <= now
            and self._runs[j.run_id].pipeline == pipeline
        ]
        return min(keys, default=0.0)

    def get_run(self, run_id: str) -> Run:
        with self._lock:
            try:
                return self._runs[run_id]
            except KeyError:
                raise KeyError(f"no run {run_id!r}") from None

    def list_runs(self) -> list[Run]:
        with self._lock:
            return sorted(self._runs.values(), key=lambda r: r.created_at)

    def items(self, run_id: str) -> list[Item]:
        with self._lock:
            return self._items.of_run(run_id)

    def jobs(self, run_id: str) -> list[Job]:
        with self._lock:
            return self._jobs.of_run(run_id)

    def attempts(self, run_id: str) -> list[Attempt]:
        with self._lock:
            ids = set(self._jobs.by_run.get(run_id, ()))
            return [a for a in self._attempts if a.job_id in ids]

    def counts(self, run_id: str) -> RunCounts:
        with self._lock:
            counts = RunCounts()
            counts.items_by_status.update(self._items.tally.get(run_id, {}))
            counts.jobs_by_stage_status.update(self._jobs.tally.get(run_id, {}))
            return counts

    def run_summary(self, run_id: str) -> RunSummary:
        with self._lock:
            notes: dict[str, int] = {}
            for n in self.notifications(run_id):
                notes[n.status.value] = notes.get(n.status.value, 0) + 1
            return summarize(
                self.get_run(run_id),
                self._stages[run_id],
                self.counts(run_id),
                sum(i.failures for i in self.items(run_id)),
                group_attempts(self.attempts(run_id)),
                notes,
            )

    def purge_finished_runs(self, retention_s: float, now: float) -> Purge:
        with self._lock:
            result = Purge()
            for run in sorted(self._runs.values(), key=lambda r: r.created_at):
                if (
                    run.status is RunStatus.RUNNING
                    or run.finished_at is None
                    or run.finished_at > now - retention_s
                    or run.purged_at is not None
                ):
                    continue
                if RUN_FINISHED in self._notify_kinds[run.id] and not any(
                    n.run_id == run.id
                    and n.kind == RUN_FINISHED
                    and n.key == final_key(run.round)
                    and n.status is NotificationStatus.SENT
                    for n in self._outbox.values()
                ):
                    result.waiting.append(run.id)
                    continue
                for item in self.items(run.id):
                    self._items[item.id] = replace(item, payload=None, outputs={})
                for job in self.jobs(run.id):
                    self._jobs[job.id] = replace(job, output=None)
                self._runs[run.id] = replace(run, purged_at=now)
                result.purged.append(run.id)
            return result

    # admin actions -------------------------------------------------------------------------------
    def _find_item(self, run_id: str, item_key: str) -> Item:
        self.get_run(run_id)
        for item in self._items.values():
            if item.run_id == run_id and item.key == item_key:
                return item
        raise KeyError(f"run {run_id} has no item {item_key!r}")

    def retry_item(
        self, run_id: str, item_key: str, now: float, from_stage: str | None = None
    ) -> Item:
        with self._lock:
            item = self._find_item(run_id, item_key)
            again = rerun_from(self._stages[run_id], from_stage)
            if item.status is not ItemStatus.NEEDS_REUPLOAD:
                raise ValueError(not_retryable(item))
            run = self._runs[run_id]
            if run.purged_at is not None:
                raise ValueError(purged(run_id))
            if run.status is not RunStatus.RUNNING:
                self._runs[run_id] = replace(
                    run, status=RunStatus.RUNNING, finished_at=None, round=run.round + 1
                )
            for job in self._jobs.of_run(run_id):
                gave_up = job.status in (JobStatus.FAILED, JobStatus.CANCELLED)
                mine = job.item_id == item.id and (gave_up or job.stage in again)
                if job.item_id is None or mine:
                    self._leases.pop(job.id, None)  # a run-scope job in flight loses its lease
                    self._jobs[job.id] = replace(
                        job,
                        status=JobStatus.PENDING,
                        attempts=0,
                        model_index=0,
                        model_failures=0,
                        last_error=None,
                        next_run_at=now,
                        output=None,
                    )
            siblings = {j.stage: j for j in self._jobs.of_item(item.id)}
            stages = self._stages[run_id]
            step = transitions.item_step(stages, {s: j.status for s, j in siblings.items()})
            self._apply(step, siblings, now)
            statuses = {s: self._jobs[j.id].status for s, j in siblings.items()}
            kept = {stage: out for stage, out in item.outputs.items() if stage not in again}
            item = replace(item, status=transitions.item_status(statuses), error=None, outputs=kept)
            self._items[item.id] = item
            return copy.deepcopy(item)

    def skip_item(self, run_id: str, item_key: str, reason: str, now: float) -> Item:
        with self._lock:
            item = self._find_item(run_id, item_key)
            if item.status not in SKIPPABLE:
                raise ValueError(not_skippable(item))
            note = skip_note(reason)
            cancelled: set[str] = set()
            for job in self._jobs.of_item(item.id):
                if not job.status.settled:
                    self._leases.pop(job.id, None)  # its worker now gets LeaseLost (D-10)
                    self._jobs[job.id] = replace(job, status=JobStatus.CANCELLED, last_error=note)
                    cancelled.add(job.stage)
            self._items[item.id] = replace(item, error=note)
            self._settle(run_id, item.id, cancelled, now)
            return copy.deepcopy(self._items[item.id])

    # claiming ----------------------------------------------------------------------------------
    def _wanted(self, job: Job, stages: Collection[str] | None, pipeline: str | None) -> bool:
        return (stages is None or job.stage in stages) and (
            pipeline is None or self._runs[job.run_id].pipeline == pipeline
        )

    def _claimable(
        self, now: float, stages: Collection[str] | None, pipeline: str | None
    ) -> list[tuple[Job, bool]]:
        found: list[tuple[Job, bool]] = []
        for job in self._jobs.open_jobs():
            if not self._wanted(job, stages, pipeline):
                continue
            if job.status is JobStatus.READY and job.next_run_at <= now:
                found.append((job, False))
            elif job.status is JobStatus.RUNNING and self._leases[job.id].expires_at <= now:
                found.append((job, True))
        found.sort(key=lambda p: (-p[0].priority, p[0].fair_key, p[0].next_run_at, p[0].id))
        return found

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
        with self._lock:
            claim = Claim()
            quotas: dict[str, Quota] = {}
            considered = 0  # as the SQL store's LIMIT: denied and postponed jobs count too
            budget = limit  # more after a denial that leaves room to backfill (claims.py)
            spent: set[str] = set()  # models denied with no room left (claims.py)
            for job, reclaimed in self._claimable(now, stages, pipeline):
                if considered >= budget or len(claim.jobs) >= limit:
                    break
                # an expiry earlier in this loop may have cancelled this job: use its current state
                job = self._jobs[job.id]
                if job.status is not (JobStatus.RUNNING if reclaimed else JobStatus.READY):
                    continue
                if reclaimed:
                    job = self._expire(job, now)
                    if job.status is JobStatus.FAILED:
                        continue
                considered += 1
                item = self._items.get(job.item_id) if job.item_id else None
                lease = Lease(job.id, uuid.uuid4().hex, now + lease_s)
                running = item
                if item is not None and item.status is ItemStatus.QUEUED:
                    running = replace(item, status=ItemStatus.RUNNING)
                candidate = ClaimedJob(
                    replace(job, status=JobStatus.RUNNING),
                    lease,
                    self._runs[job.run_id],
                    copy.deepcopy(running),
                    reclaimed,
                )
                booked = self._plan_and_book(candidate, plan, quotas, now, spent)
                if isinstance(booked, _Left):
                    if reclaimed:  # as after a denial
                        self._jobs[job.id] = replace(job, status=JobStatus.READY)
                    continue
                if isinstance(booked, Denied):
                    claim.denied.append(booked)
                    if quotas[booked.model].can_backfill:
                        budget = max(budget, limit + LOOKAHEAD)
                    else:
                        spent.add(booked.model)
                    if reclaimed:  # its expired lease is gone: it waits READY like the rest
                        self._jobs[job.id] = replace(job, status=JobStatus.READY)
                    continue
                if isinstance(booked, Postpone):
                    self._jobs[job.id] = replace(
                        job, status=JobStatus.READY, next_run_at=booked.at, last_error=booked.reason
                    )
                    continue
                self._leases[job.id] = lease
                self._jobs[job.id] = candidate.job
                if running is not None:
                    self._items[running.id] = running
                claim.jobs.append(replace(candidate, reservation=booked))
            return claim

    def _plan_and_book(
        self,
        candidate: ClaimedJob,
        plan: Plan,
        quotas: dict[str, Quota],
        now: float,
        spent: Collection[str] = (),
    ) -> Reservation | Denied | Postpone | _Left | None:
        """Ask the plan what to reserve; a spent day parks the model and asks again. A job for
        a model in `spent` is left as it is (_LEFT)."""
        while True:
            wanted = plan(candidate, lambda model: self.model_state(model, now))
            if not isinstance(wanted, Booking):
                return wanted
            if wanted.model in spent:
                return _LEFT
            quota = quotas.get(wanted.model)
            if quota is None:
                quota = quotas[wanted.model] = Quota(
                    wanted.limits, self._usage(wanted.model, wanted.limits, now), now, admit
                )
            verdict = quota.book(wanted.tokens)
            if not isinstance(verdict, Deny):
                return self._book(wanted.model, wanted.limits, wanted.tokens, now)
            if verdict.reason != "rpd":
                return Denied(candidate.job, wanted.model, verdict)
            self.block_model(wanted.model, verdict.retry_at, "day")  # the plan falls back now

    def _expire(self, job: Job, now: float) -> Job:
        """The owner died or stalled: count that as a failed attempt, so a job that kills its
        worker every time ends up failed instead of looping forever."""
        lease = self._leases.pop(job.id)
        result = AttemptResult(
            started_at=lease.expires_at,
            finished_at=now,
            error_kind="lease_expired",
            error_message="lease expired: the worker died or stalled",
        )
        self._record(job, result)
        job = replace(job, attempts=job.attempts + 1, last_error=result.error_message)
        if job.attempts >= job.max_attempts:
            job = replace(job, status=JobStatus.FAILED)
            self._jobs[job.id] = job
            if job.item_id is not None:
                item = self._items[job.item_id]
                self._items[item.id] = replace(item, error=f"{job.stage}: {result.error_message}")
            self._after_settle(job, now)
        return job

    def next_due(
        self, stages: Collection[str] | None = None, pipeline: str | None = None
    ) -> float | None:
        with self._lock:
            times = [
                j.next_run_at if j.status is JobStatus.READY else self._leases[j.id].expires_at
                for j in self._jobs.open_jobs()
                if j.status in (JobStatus.READY, JobStatus.RUNNING)
                and self._wanted(j, stages, pipeline)
            ]
            return min(times) if times else None

    def leased(self, pipeline: str | None = None) -> Leased:
        with self._lock:
            expiries = [
                self._leases[j.id].expires_at
                for j in self._jobs.open_jobs()
                if j.status is JobStatus.RUNNING and self._wanted(j, None, pipeline)
            ]
            return Leased(len(expiries), min(expiries, default=None))

    def heartbeat(self, lease: Lease, now: float, lease_s: float) -> Lease:
        with self._lock:
            self._check(lease, now)
            renewed = replace(lease, expires_at=now + lease_s)
            self._leases[lease.job_id] = renewed
            return renewed

    def heartbeat_all(
        self, leases: Sequence[Lease], now: float, lease_s: float
    ) -> list[Lease | None]:
        with self._lock:
            renewed: list[Lease | None] = []
            for lease in leases:
                try:
                    renewed.append(self.heartbeat(lease, now, lease_s))
                except LeaseLost:
                    renewed.append(None)
            return renewed

    def _check(self, lease: Lease, now: float) -> Job:
        job = self._jobs.get(lease.job_id)
        held = self._leases.get(lease.job_id)
        if (
            job is None
            or job.status is not JobStatus.RUNNING
            or held is None
            or held.token != lease.token
        ):
            raise LeaseLost(f"job {lease.job_id} is no longer leased to this worker")
        return job

    # finishing ---------------------------------------------------------------------------------
    def finish(self, batch: Sequence[Finish], now: float) -> list[bool]:
        with self._lock:
            held: list[bool] = []
            for done in batch:
                if isinstance(done, Failure) and done.block is not None:
                    self.block_model(done.block.model, done.block.until, done.block.reason)
                try:
                    if isinstance(done, Completion):
                        self.complete(done.lease, done.result, done.output, now)
                    elif isinstance(done, Failure):
                        self.fail(done.lease, done.result, done.outcome, now)
                    else:
                        self.release(done.lease, done.at, done.reason, now)
                except LeaseLost:
                    held.append(False)
                    continue
                held.append(True)
                if done.used is not None:
                    self._reconcile(done.used)
            return held

    def complete(self, lease: Lease, result: AttemptResult, output: JSON, now: float) -> None:
        with self._lock:
            job = self._check(lease, now)
            self._record(job, result)
            self._jobs[job.id] = replace(
                job,
                status=JobStatus.SUCCEEDED,
                output=_as_stored(output),
                attempts=job.attempts + (1 if result.counted else 0),
                last_error=None,
            )
            del self._leases[job.id]
            if job.item_id is not None:
                item = self._items[job.item_id]
                outputs = {**item.outputs, job.stage: _as_stored(output)}
                self._items[item.id] = replace(item, outputs=outputs)
            self._after_settle(job, now)

    def fail(self, lease: Lease, result: AttemptResult, outcome: Outcome, now: float) -> None:
        with self._lock:
            job = self._check(lease, now)
            self._record(job, result)
            counted = job.attempts + (1 if result.counted else 0)
            if isinstance(outcome, GiveUp):
                self._jobs[job.id] = replace(
                    job, status=JobStatus.FAILED, attempts=counted, last_error=outcome.reason
                )
                del self._leases[job.id]
                if job.item_id is not None:
                    item = self._items[job.item_id]
                    self._items[item.id] = replace(item, error=f"{job.stage}: {outcome.reason}")
                self._after_settle(job, now)
                return
            same_model = outcome.model_index == job.model_index
            self._jobs[job.id] = replace(
                job,
                status=JobStatus.READY,
                attempts=counted,
                next_run_at=outcome.at,
                model_index=outcome.model_index,
                last_error=outcome.reason,
                model_failures=(job.model_failures + 1 if same_model else 0)
                if result.counted
                else (job.model_failures if same_model else 0),
            )
            del self._leases[job.id]

    def release(self, lease: Lease, at: float, reason: str, now: float) -> None:
        with self._lock:
            job = self._check(lease, now)
            self._jobs[job.id] = replace(
                job, status=JobStatus.READY, next_run_at=at, last_error=reason
            )
            del self._leases[job.id]

    def _record(self, job: Job, result: AttemptResult) -> None:
        item_key = self._items[job.item_id].key if job.item_id else None
        self._attempts.append(Attempt(next(self._ids), job.id, job.stage, item_key, result))

    def _after_settle(self, job: Job, now: float) -> None:
        self._settle(job.run_id, job.item_id, {job.stage}, now)

    def _settle(
        self, run_id: str, item_id: str | None, changed: Collection[str], now: float
    ) -> None:
        """Advance the item (if any) and the run after jobs of the `changed` stages settled.

        Only those stages, and the ones this cancels, are checked for stage milestones (as the
        SQL store does): a stage none of whose jobs changed did not just complete.
        """
        stages = self._stages[run_id]
        milestones = self._milestones(run_id)
        if item_id is not None:
            siblings = {j.stage: j for j in self._jobs.of_item(item_id)}
            step = transitions.item_step(stages, {s: j.status for s, j in siblings.items()})
            self._apply(step, siblings, now)
            statuses = {s: self._jobs[j.id].status for s, j in siblings.items()}
            item = self._items[item_id]
            status = transitions.item_status(statuses)
            if status is ItemStatus.NEEDS_REUPLOAD and item.status is not status:
                item = replace(item, failures=item.failures + 1)
                milestones.item_failed(item, now)
            self._items[item.id] = replace(item, status=status)
            touched = {*changed, *step.cancel}
            milestones.stages_settled(
                self.counts(run_id), {n: s for n, s in stages.items() if n in touched}, now
            )
        self._advance_run(run_id, now)

    def _apply(self, step: transitions.GraphStep, jobs: Mapping[str, Job], now: float) -> None:
        for stage in step.ready:
            self._jobs[jobs[stage].id] = replace(
                jobs[stage], status=JobStatus.READY, next_run_at=now
            )
        for stage in step.cancel:
            self._jobs[jobs[stage].id] = replace(jobs[stage], status=JobStatus.CANCELLED)

    def _advance_run(self, run_id: str, now: float) -> None:
        run = self._runs[run_id]
        if run.status is not RunStatus.RUNNING:
            return
        counts = self.counts(run_id)
        unsettled = sum(
            n
            for (stage, st), n in counts.jobs_by_stage_status.items()
            if self._stages[run_id][stage].scope is Scope.ITEM and not JobStatus(st).settled
        )
        run_jobs = {j.stage: j for j in self._jobs.of_run(run_id) if j.item_id is None}
        step = transitions.run_step(
            self._stages[run_id], {s: j.status for s, j in run_jobs.items()}, unsettled == 0
        )
        self._apply(step, run_jobs, now)
        if unsettled:
            return
        status = transitions.run_status(
            {s: self._jobs[j.id].status for s, j in run_jobs.items()}, counts.items_by_status
        )
        if status is not RunStatus.RUNNING:
            self._runs[run_id] = replace(run, status=status, finished_at=now)
            self._milestones(run_id).run_finished(status, counts, now)

    # rate ledger ---------------------------------------------------------------------------------
    def reserve(
        self, model: str, limits: ModelLimits, tokens: int, now: float
    ) -> Reservation | Deny:
        with self._lock:
            verdict = Quota(limits, self._usage(model, limits, now), now, admit).book(tokens)
            if isinstance(verdict, Deny):
                return verdict
            return self._book(model, limits, tokens, now)

    def _usage(self, model: str, limits: ModelLimits, now: float) -> Usage:
        window, in_flight = [], 0
        for (m, slot), (requests, tokens, open_) in self._slots.items():
            if m != model:
                continue
            at = slot_time(slot)
            if at > now - limits.span_s:
                window.append(WindowEntry(at, tokens, requests))
            if at > now - IN_FLIGHT_TTL_S:
                in_flight += max(0, open_)
        block = self._blocks.get(model)
        return Usage(
            window=window,
            day_requests=self._days.get((model, day_start(now, limits.day_tz)), 0),
            in_flight=in_flight,
            blocked_until=block.blocked_until if block else 0.0,
        )

    def _book(self, model: str, limits: ModelLimits, tokens: int, now: float) -> Reservation:
        made = Reservation(
            model, tokens, now, window_slot(now), day_start(now, limits.day_tz), limits.day_tz
        )
        self._change(booked([made]))
        self._prune(now)
        return made

    def _change(self, change: LedgerChange) -> None:
        for key, delta in change.existing.items():
            row = self._slots.get(key)
            if row is not None:  # else pruned: it no longer counts anywhere
                for i, d in enumerate(delta):
                    row[i] += d
        for key, delta in change.created.items():
            row = self._slots.setdefault(key, [0, 0, 0])
            for i, d in enumerate(delta):
                row[i] += d
        for day, n in change.days.items():
            self._days[day] = self._days.get(day, 0) + n

    def _prune(self, now: float) -> None:
        oldest = window_slot(now - IN_FLIGHT_TTL_S - 120.0)
        for key in [k for k in self._slots if k[1] < oldest]:
            del self._slots[key]
        for day in [k for k in self._days if k[1] < now - KEEP_DAYS_S]:
            del self._days[day]

    def reconcile(
        self,
        reservation: Reservation,
        tokens: int,
        sent_at: float | None = None,
        *,
        sent: bool = True,
    ) -> None:
        with self._lock:
            self._reconcile(Used(reservation, tokens, sent_at, sent))

    def _reconcile(self, used: Used) -> None:
        self._change(reconciled([used]))

    def block_model(self, model: str, until: float, reason: str) -> None:
        with self._lock:
            current = self._blocks.get(model)
            if current is None or until > current.blocked_until:
                self._blocks[model] = ModelState(model, until, reason)

    def model_state(self, model: str, now: float) -> ModelState:
        with self._lock:
            state = self._blocks.get(model)
            if state is None or state.blocked_until <= now:
                return ModelState(model, 0.0, None)
            return state

    # outbox -------------------------------------------------------------------------------------
    def _milestones(self, run_id: str) -> Milestones:
        return Milestones(
            run_id,
            self._notify_kinds.get(run_id, frozenset()),
            self._add_notification,
            self._runs[run_id].round,
        )

    def _add_notification(
        self, run_id: str, kind: str, key: str, payload: JSON, now: float
    ) -> None:
        if any(
            n.run_id == run_id and n.kind == kind and n.key == key for n in self._outbox.values()
        ):
            return  # the unique (run, kind, key) rule of the SQL store
        nid = next(self._ids)
        self._outbox[nid] = Notification(
            nid, run_id, kind, key, payload, NotificationStatus.PENDING, 0, now
        )

    def pending_notifications(self, now: float, limit: int = 50) -> list[Notification]:
        with self._lock:
            due = [
                n
                for n in self._outbox.values()
                if n.status is NotificationStatus.PENDING and n.next_attempt_at <= now
            ]
            return sorted(due, key=lambda n: n.id)[:limit]

    def claim_notifications(
        self, now: float, limit: int = 50, hold_s: float = 300.0, *, idempotent: bool = False
    ) -> list[Notification]:
        with self._lock:
            claimable = [NotificationStatus.PENDING]
            for n in list(self._outbox.values()):
                if n.status is NotificationStatus.SENDING and n.next_attempt_at <= now:
                    if idempotent:
                        continue  # taken again below: the resend carries the same key
                    self._outbox[n.id] = replace(
                        n,
                        status=NotificationStatus.IN_DOUBT,
                        attempts=n.attempts + 1,
                        error=IN_DOUBT_ERROR,
                    )
            if idempotent:
                claimable.append(NotificationStatus.SENDING)
            due = sorted(
                (
                    n
                    for n in self._outbox.values()
                    if n.status in claimable and n.next_attempt_at <= now
                ),
                key=lambda n: n.id,
            )[:limit]
            claimed = []
            for n in due:
                n = replace(n, status=NotificationStatus.SENDING, next_attempt_at=now + hold_s)
                self._outbox[n.id] = n
                claimed.append(n)
            return claimed

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
        with self._lock:
            n = self._outbox[notification_id]
            attempts = n.attempts + 1
            if sent:
                if n.status is NotificationStatus.SENT:
                    return False
                n = replace(
                    n,
                    status=NotificationStatus.SENT,
                    sent_at=now,
                    attempts=attempts,
                    error=None,
                    provider_id=provider_id,
                )
            elif n.status is not NotificationStatus.SENDING:
                return False  # moved on while this sender was away (see the Protocol)
            elif in_doubt:
                n = replace(n, status=NotificationStatus.IN_DOUBT, attempts=attempts, error=error)
            elif retry_at is not None:
                n = replace(
                    n,
                    status=NotificationStatus.PENDING,
                    attempts=attempts,
                    error=error,
                    next_attempt_at=retry_at,
                )
            else:
                n = replace(n, status=NotificationStatus.FAILED, attempts=attempts, error=error)
            self._outbox[notification_id] = n
            return True

    def resolve_notification(
        self, notification_id: int, *, resend: bool, now: float
    ) -> Notification:
        with self._lock:
            n = self._outbox.get(notification_id)
            if n is None:
                raise KeyError(f"no notification {notification_id}")
            check_resolvable(n)
            if resend:
                n = replace(n, status=NotificationStatus.PENDING, next_attempt_at=now)
            else:
                n = replace(n, status=NotificationStatus.SENT, sent_at=now, error=None)
            self._outbox[notification_id] = n
            return n

    def notifications(self, run_id: str) -> list[Notification]:
        with self._lock:
            return sorted(
                (n for n in self._outbox.values() if n.run_id == run_id), key=lambda n: n.id
            )

    def close(self) -> None:
        pass


def _as_stored(output: JSON) -> JSON:
    """A copy of `output` as a SQL store gives it back (through JSON: dict keys become
    strings, tuples lists), so what passes on memory passes on SQL; deepcopy also recursed in
    Python, failing on outputs nested a few hundred deep that JSON stores keep."""
    stored: JSON = json.loads(json.dumps(output))
    return stored
