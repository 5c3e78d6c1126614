"""The dispatcher: claims jobs, reserves quota, calls models, records outcomes (anyio).

One Dispatcher drives many jobs at once (LLM calls take seconds). Several dispatchers, in one
process or many, can share a Store: claims, leases and rate bookings are the Store's job.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import anyio

from llm_batch_queue import events
from llm_batch_queue.adapters.base import ModelAdapter, ModelRequest, ModelResponse
from llm_batch_queue.clock import Clock, SystemClock
from llm_batch_queue.errors import (
    CallError,
    ConfigError,
    ErrorKind,
    LeaseLost,
    PermanentError,
    RateLimited,
    RequestTooLarge,
    TransientError,
)
from llm_batch_queue.estimator import TokenEstimator
from llm_batch_queue.jobs import JSON, AttemptResult, ClaimedJob, GiveUp, Lease, Retry, RunStatus
from llm_batch_queue.limits import Deny, ModelLimits
from llm_batch_queue.pipeline import ModelStage, Pipeline, StageContext, TaskStage
from llm_batch_queue.retry import RetryPolicy, decide
from llm_batch_queue.store.base import Reservation, Store


class HandlerError(CallError):
    """A task stage raised something that is not a CallError: retried like a transient error."""

    kind = ErrorKind.HANDLER


class Outbox(Protocol):
    """Something that delivers pending notifications after their transaction committed."""

    async def drain(self) -> int: ...


@dataclass(frozen=True, slots=True)
class DispatcherSettings:
    concurrency: int = 16  # jobs in flight at once
    lease_s: float = 60.0
    heartbeat_s: float = 15.0
    idle_poll_s: float = 1.0
    # jobs claimed per turn of the loop, each turn letting them reserve and send before the
    # next: ModelLimits.window_margin_s must cover the time from a booking to its request
    # reaching the provider, and the other new jobs' database work runs in between
    claim_batch: int = 4
    job_timeout_s: float = 900.0  # a stage (model call or task) running longer is failed
    # reserve what the adapter's count_tokens says (one more request per new prompt, cached)
    # instead of a length-based estimate; falls back to the estimate when it answers None/fails
    count_tokens: bool = False
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    )

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError("concurrency must be at least 1")
        if self.claim_batch < 1:
            raise ConfigError("claim_batch must be at least 1")
        if not 0 < self.heartbeat_s < self.lease_s:
            raise ConfigError("heartbeat_s must be positive and shorter than lease_s")
        if not self.job_timeout_s > 0:
            raise ConfigError("job_timeout_s must be positive")


@dataclass(slots=True)
class DispatchStats:
    claimed: int = 0
    succeeded: int = 0
    failed_attempts: int = 0
    gave_up: int = 0
    deferred: int = 0
    provider_429: int = 0
    fallbacks: int = 0
    leases_lost: int = 0
    store_errors: int = 0  # failures that could not even be recorded (the store was down)


class Dispatcher:
    def __init__(
        self,
        store: Store,
        pipeline: Pipeline,
        adapter: ModelAdapter | Mapping[str, ModelAdapter] | None = None,
        *,
        limits: Mapping[str, ModelLimits] | None = None,
        clock: Clock | None = None,
        retry: RetryPolicy | None = None,
        settings: DispatcherSettings | None = None,
        on_event: events.EventSink | None = None,
        outbox: Outbox | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.pipeline = pipeline
        self.clock = clock or SystemClock()
        self.retry = retry or RetryPolicy()
        self.settings = settings or DispatcherSettings()
        self.limits = dict(limits or {})
        self.stats = DispatchStats()
        self._adapters = _adapter_map(pipeline, adapter)
        self._emit = on_event or (lambda _e: None)
        self._outbox = outbox
        self._rng = rng or random.Random()
        self._estimator = TokenEstimator()
        # local hint: no quota for this stage until (time, the denial's reason)
        self._stage_hold: dict[str, tuple[float, str]] = {}
        self._counted: dict[tuple[str, bytes], int] = {}  # count_tokens answers, by prompt
        self._claim_batch = self.settings.claim_batch  # jobs to claim per turn (see _loop)
        self._429_streak: dict[str, int] = {}
        self._in_flight = 0
        self._wake = anyio.Event()

    # public loops -------------------------------------------------------------------------------
    async def run_once(
        self, time_budget_s: float | None = None, max_jobs: int | None = None
    ) -> DispatchStats:
        """One cron tick: run what is due now, start nothing after the budget, finish in-flight."""
        deadline = None if time_budget_s is None else self.clock.now() + time_budget_s
        return await self._loop(deadline=deadline, max_jobs=max_jobs, wait_for_future=False)

    async def run_until_idle(
        self, max_wait_s: float | None = None, *, run_id: str | None = None
    ) -> DispatchStats:
        """Run until no job is runnable or waiting, sleeping through backoffs and rate windows.

        With `max_wait_s`, return instead of sleeping longer than that for the next due job.
        With `run_id`, return as soon as that run has finished (other runs' jobs may still be
        queued: they are left to other dispatchers or a later call).
        """
        return await self._loop(
            deadline=None,
            max_jobs=None,
            wait_for_future=True,
            max_wait_s=max_wait_s,
            run_id=run_id,
        )

    async def run_forever(self, stop: anyio.Event) -> DispatchStats:
        return await self._loop(deadline=None, max_jobs=None, wait_for_future=True, stop=stop)

    async def _loop(
        self,
        *,
        deadline: float | None,
        max_jobs: int | None,
        wait_for_future: bool,
        max_wait_s: float | None = None,
        stop: anyio.Event | None = None,
        run_id: str | None = None,
    ) -> DispatchStats:
        started = 0
        async with anyio.create_task_group() as tg:
            while True:
                if stop is not None and stop.is_set():
                    break
                if run_id is not None and self._finished(run_id):
                    if self._in_flight == 0:
                        break
                    await self._wait(None)  # claim nothing more; let in-flight jobs finish
                    continue
                now = self.clock.now()
                budget_left = deadline is None or now < deadline
                room = self.settings.concurrency - self._in_flight
                room = min(room, self._claim_batch)
                if max_jobs is not None:
                    room = min(room, max_jobs - started)
                claimed: list[ClaimedJob] = []
                if budget_left and room > 0:
                    claimed = self.store.claim(
                        worker=self.settings.worker_id,
                        now=now,
                        limit=room,
                        lease_s=self.settings.lease_s,
                        stages=self._claimable_stages(now),
                        pipeline=self.pipeline.name,
                    )
                for job in claimed:
                    started += 1
                    self._in_flight += 1
                    self.stats.claimed += 1
                    tg.start_soon(self._run_job, job)
                await self._drain_outbox()
                if claimed:
                    # let the new jobs reserve and send before claiming more: a reservation is
                    # booked at the time it is made, and every other job's database work that
                    # runs before its request leaves delays the request past that time
                    await anyio.lowlevel.checkpoint()
                    continue
                out_of_jobs = max_jobs is not None and started >= max_jobs
                if not budget_left or out_of_jobs:
                    if self._in_flight == 0:
                        break
                    await self._wait(None)
                    continue
                due = self._next_due(now)
                if self._in_flight == 0:
                    if due is None:
                        break
                    if not wait_for_future and due > now:
                        break
                    if max_wait_s is not None and due - now > max_wait_s:
                        break
                await self._wait(due)
        await self._drain_outbox()
        return self.stats

    def _finished(self, run_id: str) -> bool:
        return self.store.get_run(run_id).status is not RunStatus.RUNNING

    async def _wait(self, due: float | None) -> None:
        now = self.clock.now()
        timeout = self.settings.idle_poll_s
        if due is not None:
            timeout = max(0.0, min(timeout, due - now))
        if self._in_flight == 0:
            await self.clock.sleep(timeout)
            return
        self._wake = anyio.Event()
        with anyio.move_on_after(timeout):
            await self._wake.wait()

    def _next_due(self, now: float) -> float | None:
        """The next moment a claim could succeed, counting local holds on stages."""
        stages = self._claimable_stages(now)
        due = self.store.next_due(stages, self.pipeline.name)
        holds = [until for until, _ in self._stage_hold.values() if until > now]
        if holds and self.store.next_due(None, self.pipeline.name) is not None:
            due = min(holds) if due is None else min(due, min(holds))
        return due

    def _claimable_stages(self, now: float) -> list[str] | None:
        held = {s for s, (until, _) in self._stage_hold.items() if until > now}
        if not held:
            return None
        return [s.name for s in self.pipeline.stages if s.name not in held]

    async def _drain_outbox(self) -> None:
        if self._outbox is not None:
            await self._outbox.drain()

    # one job --------------------------------------------------------------------------------------
    async def _run_job(self, claimed: ClaimedJob) -> None:
        job = claimed.job
        self._emit(
            events.JobClaimed(
                job.id,
                job.run_id,
                job.stage,
                claimed.item.key if claimed.item else None,
                claimed.reclaimed,
            )
        )
        lease_box = [claimed.lease]
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat, lease_box, tg.cancel_scope)
                # every exception is handled in here: one job's trouble (a lost lease, a store
                # error, a bug) must never escape the task group and take the dispatcher down
                try:
                    await self._run_stage(claimed, lease_box)
                except LeaseLost:
                    self.stats.leases_lost += 1
                    self._emit(events.LeaseLost(job.id, job.stage))
                except Exception as exc:
                    self._crashed(claimed, lease_box[0], exc)
                finally:
                    tg.cancel_scope.cancel()
        except anyio.get_cancelled_exc_class():
            # the dispatcher is stopping: hand the job back now rather than after the lease
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                self.store.release(
                    lease_box[0], self.clock.now(), "dispatcher stopped", self.clock.now()
                )
            raise
        finally:
            self._in_flight -= 1
            self._wake.set()

    async def _run_stage(self, claimed: ClaimedJob, lease_box: list[Lease]) -> None:
        stage = self.pipeline.stage(claimed.job.stage)
        with anyio.fail_after(self.settings.job_timeout_s):
            if isinstance(stage, TaskStage):
                await self._run_task(stage, claimed, lease_box)
            else:
                await self._run_model(stage, claimed, lease_box)

    def _crashed(self, claimed: ClaimedJob, lease: Lease, exc: Exception) -> None:
        """Record an unexpected error as this job's failed attempt; if even that fails (the
        store is down), leave the job to be taken over when its lease expires."""
        if isinstance(exc, TimeoutError):
            error: CallError = TransientError(
                f"stage did not finish within {self.settings.job_timeout_s:g} s"
            )
        else:
            error = HandlerError(f"{type(exc).__name__}: {exc}")
        try:
            stage = self.pipeline.stage(claimed.job.stage)
            models = stage.models if isinstance(stage, ModelStage) else ()
            model = models[claimed.job.model_index] if models else None
            self._record_failure(claimed, lease, models, error, self.clock.now(), model, 0)
        except LeaseLost:
            self.stats.leases_lost += 1
        except Exception as again:
            self.stats.store_errors += 1
            self._emit(
                events.JobCrashed(
                    claimed.job.id,
                    claimed.job.stage,
                    f"{error.message}; recording it failed: {again}",
                )
            )

    async def _heartbeat(self, lease_box: list[Lease], scope: anyio.CancelScope) -> None:
        while True:
            await anyio.sleep(self.settings.heartbeat_s)
            try:
                lease_box[0] = self.store.heartbeat(
                    lease_box[0],
                    self.clock.now(),
                    self.settings.lease_s,
                )
            except LeaseLost:
                self.stats.leases_lost += 1
                scope.cancel()  # someone else owns the job now: stop working on it
                return

    def _context(self, claimed: ClaimedJob, model: str | None) -> StageContext:
        stage = self.pipeline.stage(claimed.job.stage)
        items = self.store.items(claimed.run.id) if stage.scope.value == "run" else ()
        return StageContext(
            run=claimed.run,
            item=claimed.item,
            stage=stage.name,
            attempt=claimed.job.attempts + 1,
            model=model,
            items=items,
        )

    async def _run_task(
        self, stage: TaskStage, claimed: ClaimedJob, lease_box: list[Lease]
    ) -> None:
        started = self.clock.now()
        self._got_through()
        try:
            output = await stage.run(self._context(claimed, None))
        except LeaseLost:
            raise
        except Exception as exc:  # a handler's bug must not kill the dispatcher
            error = (
                exc if isinstance(exc, CallError) else HandlerError(f"{type(exc).__name__}: {exc}")
            )
            self._record_failure(claimed, lease_box[0], (), error, started, None, 0)
            return
        result = AttemptResult(started_at=started, finished_at=self.clock.now())
        self.store.complete(lease_box[0], result, output, self.clock.now())
        self.stats.succeeded += 1
        self._emit(
            events.CallSucceeded(
                claimed.job.id, stage.name, None, False, 0, 0, result.finished_at - started
            )
        )

    async def _run_model(
        self, stage: ModelStage, claimed: ClaimedJob, lease_box: list[Lease]
    ) -> None:
        job = claimed.job
        now = self.clock.now()
        idx, unblocked_at = self._usable_model(stage, job.model_index, now)
        if idx is None:
            # every remaining model is parked (daily quota) or missing: wait, don't burn attempts
            reason = "every model of the chain is parked"
            self.store.release(lease_box[0], unblocked_at, reason, now)
            self.stats.deferred += 1
            return
        model = stage.models[idx]
        if idx != job.model_index:
            self._emit(
                events.FellBack(
                    job.id, stage.name, stage.models[job.model_index], model, "model unavailable"
                )
            )
            job = replace(job, model_index=idx, model_failures=0)
            claimed = replace(claimed, job=job)
        ctx = self._context(claimed, model)
        try:
            prompt = stage.prompt(ctx)
        except Exception as exc:
            self._record_failure(
                claimed,
                lease_box[0],
                stage.models,
                HandlerError(f"building the prompt failed: {exc}"),
                now,
                model,
                0,
            )
            return
        request = ModelRequest(
            model=model,
            prompt=prompt.text,
            system=prompt.system,
            output_schema=stage.output_schema(),
            temperature=stage.temperature,
            max_output_tokens=stage.max_output_tokens,
        )
        text_for_estimate = (prompt.system or "") + prompt.text
        counted = await self._count_tokens(request, text_for_estimate)
        tokens = self._estimator.estimate(model, text_for_estimate, counted=counted)
        now = self.clock.now()  # book as late as possible: the provider counts the call's arrival
        try:
            booking = self.store.reserve(model, self._limits(model), tokens, now)
        except RequestTooLarge as exc:
            self._record_failure(
                claimed, lease_box[0], stage.models, _permanent(str(exc)), now, model, 0
            )
            return
        if isinstance(booking, Deny) and booking.reason == "rpd":
            # our own ledger says the day is spent: park the model as a provider 429 would,
            # and let the chain's next model take the job now instead of waiting for midnight
            self.store.block_model(model, booking.retry_at, "day")
            self._emit(events.Deferred(job.id, stage.name, model, "rpd", booking.retry_at))
            await self._run_model(stage, claimed, lease_box)
            return
        if isinstance(booking, Deny):
            self._defer(stage, claimed, lease_box[0], model, booking)
            return
        self._got_through()
        started = self.clock.now()
        try:
            response = await self._adapters[model].generate(request)
            output = stage.parse(response)
        except CallError as exc:
            self.store.reconcile(booking, tokens, _sent_at(started, exc.send_delay_s))
            self._record_failure(claimed, lease_box[0], stage.models, exc, started, model, tokens)
            return
        except (TypeError, ValueError, AttributeError) as exc:  # an adapter broke its contract
            self.store.reconcile(booking, tokens)
            bad = HandlerError(f"adapter for {model} failed: {type(exc).__name__}: {exc}")
            self._record_failure(claimed, lease_box[0], stage.models, bad, started, model, tokens)
            return
        self._succeed(
            stage,
            claimed,
            lease_box[0],
            booking,
            response,
            output,
            started,
            text_for_estimate,
            counted,
        )

    async def _count_tokens(self, request: ModelRequest, text: str) -> int | None:
        """The provider's count of the request's input tokens, if asked for and available.

        Cached per prompt, so a job deferred for quota and claimed again is not counted twice.
        """
        if not self.settings.count_tokens:
            return None
        key = (request.model, hashlib.blake2b(text.encode(), digest_size=16).digest())
        if key in self._counted:
            return self._counted[key]
        try:
            counted = await self._adapters[request.model].count_tokens(request)
        except CallError:
            return None  # reserve the estimate; the call itself will tell what is wrong
        if counted is not None:
            if len(self._counted) >= _COUNT_CACHE_SIZE:
                del self._counted[next(iter(self._counted))]
            self._counted[key] = counted
        return counted

    def _succeed(
        self,
        stage: ModelStage,
        claimed: ClaimedJob,
        lease: Lease,
        booking: Reservation,
        response: ModelResponse,
        output: JSON,
        started: float,
        prompt_text: str,
        counted: int | None,
    ) -> None:
        usage = response.usage
        self.store.reconcile(booking, usage.input_tokens, _sent_at(started, response.send_delay_s))
        self._estimator.observe(booking.model, prompt_text, usage.input_tokens, counted=counted)
        if usage.input_tokens < booking.tokens:
            self._refunded(booking.model)
        self._429_streak[booking.model] = 0
        is_fallback = claimed.job.model_index > 0
        now = self.clock.now()
        result = AttemptResult(
            started_at=started,
            finished_at=now,
            model=booking.model,
            is_fallback=is_fallback,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            thinking_tokens=usage.thinking_tokens,
            status_code=response.status_code,
        )
        self.store.complete(lease, result, output, now)
        self.stats.succeeded += 1
        self.stats.fallbacks += int(is_fallback)
        self._emit(
            events.CallSucceeded(
                claimed.job.id,
                stage.name,
                booking.model,
                is_fallback,
                usage.input_tokens,
                usage.output_tokens,
                now - started,
            )
        )

    def _usable_model(self, stage: ModelStage, start: int, now: float) -> tuple[int | None, float]:
        """Skip models parked for the day or not found; wait out short cool-downs instead.

        Returns the model index to use, or None and when the first skipped model frees up.
        """
        unblocked_at = float("inf")
        for idx in range(start, len(stage.models)):
            state = self.store.model_state(stage.models[idx], now)
            if state.reason not in ("day", "not_found"):
                return idx, now
            unblocked_at = min(unblocked_at, state.blocked_until)
        return None, unblocked_at

    def _defer(
        self, stage: ModelStage, claimed: ClaimedJob, lease: Lease, model: str, denial: Deny
    ) -> None:
        now = self.clock.now()
        self.store.release(
            lease,
            denial.retry_at,
            f"waiting for {model} quota ({denial.reason})",
            now,
        )
        if claimed.job.model_index == 0:
            # the earliest of the denials: a smaller request may fit before a larger one
            until, _ = self._stage_hold.get(stage.name, (0.0, ""))
            if until <= now or denial.retry_at < until:
                self._stage_hold[stage.name] = (denial.retry_at, denial.reason)
        self.stats.deferred += 1
        self._claim_batch = 1
        self._emit(
            events.Deferred(claimed.job.id, stage.name, model, denial.reason, denial.retry_at)
        )

    def _got_through(self) -> None:
        """A claimed job started work: after a quota denial, claim more at a time again.

        A model at its limit frees a slot now and then; claiming a full batch the moment it
        does means one reservation admitted and the rest denied and released, in every worker
        at once: transactions that buy nothing and delay the admitted call. So after a denial
        the dispatcher claims one job, then two, four, ... (up to claim_batch) while they get
        through.
        """
        self._claim_batch = min(self._claim_batch * 2, self.settings.claim_batch)

    def _refunded(self, model: str) -> None:
        """A call used fewer tokens than it reserved: a stage held for TPM may fit now."""
        for stage in self.pipeline.stages:
            hold = self._stage_hold.get(stage.name)
            if hold is not None and hold[1] == "tpm" and model in getattr(stage, "models", ()):
                del self._stage_hold[stage.name]

    def _record_failure(
        self,
        claimed: ClaimedJob,
        lease: Lease,
        models: tuple[str, ...],
        error: CallError,
        started: float,
        model: str | None,
        tokens: int,
    ) -> None:
        now = self.clock.now()
        job = claimed.job
        streak = self._429_streak.get(model or "", 0)
        day_tz = self._limits(model).day_tz if model else "UTC"
        decision = decide(
            self.retry,
            models,
            job,
            error,
            now,
            day_tz=day_tz,
            rate_limit_streak=streak,
            rng=self._rng,
        )
        if isinstance(error, RateLimited) and model is not None:
            self.stats.provider_429 += 1
            self._429_streak[model] = streak + 1
        if decision.block is not None:
            self.store.block_model(
                decision.block.model, decision.block.until, decision.block.reason
            )
        outcome = decision.outcome
        counted = not isinstance(outcome, Retry) or outcome.counted
        result = AttemptResult(
            started_at=started,
            finished_at=now,
            model=model,
            is_fallback=job.model_index > 0,
            input_tokens=tokens,
            status_code=error.status_code,
            error_kind=error.kind.value,
            error_message=error.message[:2000],
            counted=counted,
        )
        self.store.fail(lease, result, outcome, now)
        self.stats.failed_attempts += 1
        gave_up = isinstance(outcome, GiveUp)
        self.stats.gave_up += int(gave_up)
        self._emit(
            events.CallFailed(
                job.id,
                job.stage,
                model,
                error.kind.value,
                error.message,
                error.status_code,
                gave_up,
                outcome.at if isinstance(outcome, Retry) else None,
            )
        )
        if isinstance(outcome, Retry) and outcome.model_index != job.model_index:
            self._emit(
                events.FellBack(
                    job.id,
                    job.stage,
                    models[job.model_index],
                    models[outcome.model_index],
                    outcome.reason,
                )
            )

    def _limits(self, model: str | None) -> ModelLimits:
        return self.limits.get(model or "", _UNLIMITED)


_UNLIMITED = ModelLimits()
_COUNT_CACHE_SIZE = 10_000


def _permanent(message: str) -> CallError:
    return PermanentError(message)


def _adapter_map(
    pipeline: Pipeline, adapter: ModelAdapter | Mapping[str, ModelAdapter] | None
) -> dict[str, ModelAdapter]:
    needed = pipeline.model_names
    if adapter is None:
        if needed:
            raise ConfigError(f"pipeline {pipeline.name!r} calls models but no adapter was given")
        return {}
    if isinstance(adapter, Mapping):
        missing = needed - set(adapter)
        if missing:
            raise ConfigError(f"no adapter for model(s): {', '.join(sorted(missing))}")
        return dict(adapter)
    return dict.fromkeys(needed, adapter)


def _sent_at(started: float, send_delay_s: float | None) -> float | None:
    """When the call left, on the dispatcher's clock, if the adapter saw it leave."""
    return None if send_delay_s is None else started + max(0.0, send_delay_s)
