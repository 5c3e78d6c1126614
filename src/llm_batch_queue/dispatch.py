"""The dispatcher: claims jobs with their quota, calls models, records outcomes (anyio).

One Dispatcher drives many jobs at once (LLM calls take seconds). Several dispatchers, in one
process or many, can share a Store: claims, leases and rate bookings are the Store's job.

Per job the store sees two transactions: the claim, which books the model call's quota in the
same transaction (Store.claim_work), and the finish, which records the attempt, stores the output,
reconciles the quota and releases dependents (Store.finish). Finishes that arrive while one is
being written are written together (group commit); one heartbeat renews every lease in flight.
With a store that does I/O, these run in worker threads so the event loop keeps sending.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import hashlib
import math
import os
import random
import socket
import uuid
from collections.abc import Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ParamSpec, Protocol, TypeVar

import anyio

from llm_batch_queue import events
from llm_batch_queue.adapters.base import ModelAdapter, ModelRequest, ModelResponse
from llm_batch_queue.clock import Clock, SystemClock
from llm_batch_queue.errors import (
    CallError,
    ConfigError,
    ErrorKind,
    InvalidOutput,
    RateLimited,
    RequestTooLarge,
    TooLarge,
    TransientError,
)
from llm_batch_queue.estimator import TokenEstimator
from llm_batch_queue.jobs import (
    JSON,
    AttemptResult,
    ClaimedJob,
    GiveUp,
    Lease,
    Reservation,
    Retry,
    RunStatus,
    Scope,
)
from llm_batch_queue.limits import Deny, ModelLimits
from llm_batch_queue.limits_config import DEFAULT_KEY
from llm_batch_queue.pipeline import ModelStage, Pipeline, StageContext, TaskStage
from llm_batch_queue.retry import ModelBlock, RetryPolicy, decide
from llm_batch_queue.storable import unstorable
from llm_batch_queue.store.base import (
    Booking,
    Completion,
    Denied,
    Failure,
    Finish,
    ModelState,
    Postpone,
    Release,
    Store,
    Used,
)
from llm_batch_queue.store.memory import MemoryStore

P = ParamSpec("P")
T = TypeVar("T")


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
    # jobs claimed (and booked) per claim transaction. A claim stops booking a model once its
    # quota has no room left, so a large batch costs nothing extra when little room frees up
    claim_batch: int = 32
    job_timeout_s: float = 900.0  # a stage (model call or task) running longer is failed
    # reserve what the adapter's count_tokens says (one more request per new prompt, cached)
    # instead of a length-based estimate; falls back to the estimate when it answers None/fails.
    # The count needs a call between claim and booking, so these bookings are a transaction of
    # their own rather than part of the claim
    count_tokens: bool = False
    # run store calls in worker threads (None: unless the store is a MemoryStore), so that a
    # transaction in progress never holds up the requests of other jobs
    store_in_thread: bool | None = None
    # how long to keep trying to record finished jobs while the store is unreachable (then
    # they are left to expire and be taken over, as after a crash)
    store_retry_s: float = 30.0
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
    finish_batches: int = 0  # transactions that finished jobs (several jobs each under load)


@dataclass(slots=True)
class _Prepared:
    """A model call planned while its job was claimed: the model, the request, its booking."""

    model_index: int
    request: ModelRequest
    text: str  # what the estimate was made from
    counted: int | None = None


@dataclass(slots=True)
class _Pending:
    """A finish waiting to be written, and what became of it."""

    finish: Finish
    written: anyio.Event  # its batch's: set once the whole batch is written
    held: bool = False
    error: BaseException | None = None


class _Runners:
    """Tasks that run claimed jobs one after another, as many as there are jobs in flight:
    anyio's bookkeeping for a new task (a cancel scope, an event, a wrapper coroutine) cost
    ~45 µs a job, handing a job to a waiting task a few. Each job still runs in a copy of the
    context it was handed in, as a task of its own would (see _InContext)."""

    def __init__(
        self, tg: anyio.abc.TaskGroup, run: Callable[[ClaimedJob], Coroutine[Any, Any, None]]
    ):
        self._tg, self._run = tg, run
        self._queue: collections.deque[tuple[ClaimedJob, contextvars.Context]] = collections.deque()
        self._idle: list[anyio.Event] = []  # one per runner waiting for a job
        self._runners = 0
        self._closed = False

    def hand(self, job: ClaimedJob, in_flight: int) -> None:
        """Queue `job`; `in_flight` counts it. A runner ends a job before it takes the next,
        so one runner per job in flight means no job waits for a runner."""
        self._queue.append((job, contextvars.copy_context()))
        if self._idle:
            self._idle.pop().set()
        while self._runners < in_flight:
            self._runners += 1
            self._tg.start_soon(self._serve)

    def close(self) -> None:
        """No more jobs: each runner ends once none is left for it."""
        self._closed = True
        for idle in self._idle:
            idle.set()

    async def _serve(self) -> None:
        try:
            while True:
                if self._queue:
                    job, context = self._queue.popleft()
                    await _InContext(self._run(job), context)
                elif self._closed:
                    return
                else:
                    wake = anyio.Event()
                    self._idle.append(wake)
                    try:
                        await wake.wait()
                    finally:
                        if wake in self._idle:  # cancelled while idle
                            self._idle.remove(wake)
        finally:
            # a job handed after this runner was cancelled gets a runner of its own (which,
            # cancelled at once, hands the job back: Dispatcher._run_job)
            self._runners -= 1


class _InContext:
    """Await `coro` with each of its steps run in `context`: what a task of its own would do
    (a ContextVar a job sets stays with that job), inside the runner's task, so its cancel
    scopes and shields work as in any other code of that task."""

    def __init__(self, coro: Coroutine[Any, Any, None], context: contextvars.Context):
        self._coro, self._context = coro, context

    def __await__(self) -> Generator[Any, Any, None]:
        run, send, throw = self._context.run, self._coro.send, self._coro.throw
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = run(send, value) if error is None else run(throw, error)
            except StopIteration:
                return
            value, error = None, None
            try:
                value = yield step
            except BaseException as exc:  # a cancellation, most often: it is the job's
                error = exc


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
        self._model_limits = _limits_by_model(pipeline, self.limits)
        self.stats = DispatchStats()
        self._adapters = _adapter_map(pipeline, adapter)
        self._emit = on_event or (lambda _e: None)
        self._outbox = outbox
        self._rng = rng or random.Random()
        self._estimator = TokenEstimator()
        threaded = self.settings.store_in_thread
        self._threaded = not isinstance(store, MemoryStore) if threaded is None else threaded
        self._db_threads = anyio.CapacityLimiter(4)
        # local hint: no quota for this stage until (time, the denial's reason)
        self._stage_hold: dict[str, tuple[float, str]] = {}
        self._counted: dict[tuple[str, bytes], int] = {}  # count_tokens answers, by prompt
        self._prepared: dict[str, _Prepared] = {}  # by job id, from the claim's plan
        # the rate booking of each job in flight until a finish carries it to the store; one
        # left when the job ends (lease lost, timed out, crashed, stopped) is ended on its own
        self._booked: dict[str, Used] = {}
        # jobs whose finish could not be written within store_retry_s: it may have committed,
        # so a later write of theirs that finds the lease gone leaves their booking alone
        self._unsure: set[str] = set()
        self._429_streak: dict[str, int] = {}
        self._in_flight = 0
        self._ended = 0  # jobs that have left the dispatcher, finished or not
        self._wake = anyio.Event()
        self._stop: anyio.Event | None = None  # run_forever's
        self._pending: list[_Pending] = []
        self._batch_written: anyio.Event | None = None  # the pending batch's, made with it
        self._flush_wake = anyio.Event()
        self._drain_wake = anyio.Event()
        # jobs in flight, for the heartbeat and the watchdog: lease (renewed in place), stage,
        # cancel scope, deadline (on anyio's clock)
        self._live: dict[str, tuple[list[Lease], str, anyio.CancelScope, float]] = {}
        self._planned: list[str] = []  # job ids the current claim's plan prepared
        self._local_blocks: dict[str, float] = {}  # model -> until, from 429s seen here
        self._idle_noted = False  # WaitingForLeases said since the last claim that found work
        self._noted_at = -math.inf  # when it was last said (event loop time)

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
        """Run until `stop` is set, waiting for new work when there is none (wake() or the next
        poll finds it); then claim nothing more and let the jobs in flight finish."""
        return await self._loop(deadline=None, max_jobs=None, wait_for_future=True, stop=stop)

    def wake(self) -> None:
        """Look for work now (e.g. the store announced new jobs) instead of at the next poll."""
        self._wake.set()

    async def _db(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A store call, in a worker thread if the store does I/O (see DispatcherSettings)."""
        if not self._threaded:
            return call(*args, **kwargs)
        bound = functools.partial(call, *args, **kwargs)
        return await anyio.to_thread.run_sync(bound, limiter=self._db_threads)

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
        async with anyio.create_task_group() as background:
            background.start_soon(self._flusher)
            background.start_soon(self._heartbeats)
            background.start_soon(self._drainer)
            background.start_soon(self._watchdog)
            if stop is not None:
                self._stop = stop
                background.start_soon(self._wake_on, stop)
            try:
                async with anyio.create_task_group() as tg:
                    runners = _Runners(tg, self._run_job)
                    try:
                        await self._claim_loop(runners, deadline, max_jobs, wait_for_future,
                                               max_wait_s, stop, run_id)  # fmt: skip
                    finally:
                        runners.close()  # they finish what they were handed, then end
            finally:
                background.cancel_scope.cancel()
                self._stop = None
        with anyio.CancelScope(shield=True):
            await self._drain_outbox()
        return self.stats

    async def _claim_loop(
        self,
        runners: _Runners,
        deadline: float | None,
        max_jobs: int | None,
        wait_for_future: bool,
        max_wait_s: float | None,
        stop: anyio.Event | None,
        run_id: str | None,
    ) -> None:
        started = 0
        while True:
            if stop is not None and stop.is_set():
                return  # the task group lets the jobs in flight finish
            if run_id is not None and await self._finished(run_id):
                if self._in_flight == 0:
                    return
                await self._wait(None)  # claim nothing more; let in-flight jobs finish
                continue
            now = self.clock.now()
            budget_left = deadline is None or now < deadline
            room = min(self.settings.concurrency - self._in_flight, self.settings.claim_batch)
            if max_jobs is not None:
                room = min(room, max_jobs - started)
            claimed: list[ClaimedJob] = []
            if budget_left and room > 0:
                try:
                    claim = await self._db(
                        self.store.claim_work,
                        worker=self.settings.worker_id,
                        now=now,
                        limit=room,
                        lease_s=self.settings.lease_s,
                        plan=self._plan,
                        stages=self._claimable_stages(now),
                        pipeline=self.pipeline.name,
                    )
                except Exception:
                    # the store is away (a restart, a network cut): jobs in flight carry on,
                    # and claiming resumes once it answers again
                    self.stats.store_errors += 1
                    self._forget_plans(set())
                    await anyio.sleep(self.settings.idle_poll_s)
                    continue
                claimed = claim.jobs
                for denied in claim.denied:
                    self._denied(denied)
                self._forget_plans({c.job.id for c in claimed})
            for job in claimed:
                started += 1
                self._in_flight += 1
                self.stats.claimed += 1
                runners.hand(job, self._in_flight)
            if claimed:
                self._idle_noted = False
                # let the new jobs send before claiming more: their quota was booked at the
                # claim, and the provider counts a request from when it arrives
                await anyio.lowlevel.checkpoint()
                continue
            out_of_jobs = max_jobs is not None and started >= max_jobs
            if not budget_left or out_of_jobs or room <= 0:
                if self._in_flight == 0:
                    return
                await self._wait(None)  # a job finishing makes room (or ends the loop)
                continue
            ended = self._ended
            try:
                due = await self._next_due(now)
            except Exception:
                self.stats.store_errors += 1
                due = now + self.settings.idle_poll_s
            if self._ended != ended:
                # a job ended while we asked: `due` may predate the work its finish released
                # (a new user's test run stopped early on a stale lease expiry)
                continue
            if self._in_flight == 0 and due is not None and due > now:
                ending = stop is None and (
                    not wait_for_future or (max_wait_s is not None and due - now > max_wait_s)
                )
                await self._note_leases(ending)
            if self._in_flight == 0 and stop is None:  # run_forever waits for new work
                if due is None:
                    return
                if not wait_for_future and due > now:
                    return
                if max_wait_s is not None and due - now > max_wait_s:
                    return
            await self._wait(due)

    async def _note_leases(self, ending: bool) -> None:
        """Out of work while other workers hold jobs: say so once per idle spell, at most once
        a minute (after a crash nothing happens until the dead worker's leases end, and
        silence looks like a hang; healthy workers sharing a queue meet it often)."""
        if self._idle_noted or anyio.current_time() < self._noted_at + 60.0:
            return
        self._idle_noted = True
        try:
            leased = await self._db(self.store.leased, self.pipeline.name)
        except Exception:
            return  # only a note: the loop carries on either way
        if leased.jobs and leased.first_expiry is not None:
            self._noted_at = anyio.current_time()
            self._emit(events.WaitingForLeases(leased.jobs, leased.first_expiry, ending))

    def _forget_plans(self, taken: set[str]) -> None:
        """Drop what the last claim's plan prepared for jobs it did not hand out."""
        for job_id in self._planned:
            if job_id not in taken:
                self._prepared.pop(job_id, None)
        self._planned.clear()

    async def _finished(self, run_id: str) -> bool:
        try:
            run = await self._db(self.store.get_run, run_id)
        except KeyError:
            raise
        except Exception:
            self.stats.store_errors += 1
            return False
        return run.status is not RunStatus.RUNNING

    async def _wake_on(self, stop: anyio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _wait(self, due: float | None) -> None:
        if self._stop is not None and self._stop.is_set():
            return
        now = self.clock.now()
        timeout = self.settings.idle_poll_s
        if due is not None:
            timeout = max(0.0, min(timeout, due - now))
        if self._in_flight == 0 and not isinstance(self.clock, SystemClock):
            await self.clock.sleep(timeout)  # a FakeClock moves instead of waiting
            return
        self._wake = anyio.Event()
        with anyio.move_on_after(timeout):
            await self._wake.wait()

    async def _next_due(self, now: float) -> float | None:
        """The next moment a claim could succeed, counting local holds on stages."""
        stages = self._claimable_stages(now)
        due = await self._db(self.store.next_due, stages, self.pipeline.name)
        holds = [until for until, _ in self._stage_hold.values() if until > now]
        if holds and await self._db(self.store.next_due, None, self.pipeline.name) is not None:
            due = min(holds) if due is None else min(due, min(holds))
        return due

    def _claimable_stages(self, now: float) -> list[str] | None:
        held = {s for s, (until, _) in self._stage_hold.items() if until > now}
        if not held:
            return None
        return [s.name for s in self.pipeline.stages if s.name not in held]

    # background tasks ---------------------------------------------------------------------------
    async def _flusher(self) -> None:
        """Write queued finishes, all that are waiting in one transaction."""
        while True:
            await self._flush_wake.wait()
            self._flush_wake = anyio.Event()
            await self._flush()

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            self._batch_written = None
            try:
                written = await self._write([p.finish for p in batch])
            except BaseException:
                # cancelled (the dispatcher is stopping) before the batch was written, or known
                # not to be: its jobs wait for it, shielded, and must hear of it
                for p in batch:
                    p.error = RuntimeError("the dispatcher stopped before this was recorded")
                batch[0].written.set()
                raise
            if isinstance(written, Exception):
                for p in batch:
                    p.error = written
                batch[0].written.set()
                continue
            held, first_try = written
            self.stats.finish_batches += 1
            settled = False
            for p, ok in zip(batch, held, strict=True):
                p.held = ok
                settled = settled or not isinstance(p.finish, Release)
            # a finish whose lease was lost changed nothing, its booking included, which would
            # hold its model's in-flight place until IN_FLIGHT_TTL_S. After a retry (or an
            # earlier write of the job's that failed), a lease not held may be one of our own
            # lost commits ended: left alone
            lost = [
                p.finish.used
                for p, ok in zip(batch, held, strict=True)
                if first_try and not ok and p.finish.used is not None
                and p.finish.lease.job_id not in self._unsure
            ]  # fmt: skip
            batch[0].written.set()
            if settled:
                self._drain_wake.set()
            for used in lost:
                await self._end_booking(used)

    async def _write(self, batch: list[Finish]) -> tuple[list[bool], bool] | Exception:
        """Store.finish, tried again for up to store_retry_s (see _retrying): the batch is
        conditional on each lease, so a second try after a commit whose answer was lost
        changes nothing. With whether the first try answered; the error if none did."""
        try:
            return await self._retrying(
                self.settings.store_retry_s, lambda: self.store.finish(batch, self.clock.now())
            )
        except Exception as exc:
            return exc

    async def _retrying(self, retry_s: float, call: Callable[[], T]) -> tuple[T, bool]:
        """`call` in the store, tried again while the store is away (a database restarting,
        a pooled connection that died with it) for up to retry_s; with whether the first try
        answered. The last error once retry_s has passed."""
        deadline = anyio.current_time() + retry_s
        delay = 0.05
        first_try = True
        while True:
            try:
                return await self._db(call), first_try
            except Exception:
                first_try = False
                self.stats.store_errors += 1
                if anyio.current_time() + delay > deadline:
                    raise
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _end_booking(self, used: Used) -> None:
        """Give the store a booking no finish carried (shielded: a stopping dispatcher ends
        its jobs' bookings too). Tried for a moment; a store that stays away leaves it to
        IN_FLIGHT_TTL_S."""

        def reconcile() -> None:
            self.store.reconcile(used.reservation, used.tokens, used.sent_at, sent=used.sent)

        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self._retrying(_END_RETRY_S, reconcile)

    async def _hand_back(self, job_id: str, lease: Lease) -> None:
        """The dispatcher is stopping: release the job now rather than after its lease, with
        its booking. Tried for a moment; not known to be written, the booking is left alone
        (the finally of _run_job), as the job is to its lease."""
        now = self.clock.now()
        used = self._booked.get(job_id)
        stopped = Release(lease, now, "dispatcher stopped", used)
        try:
            (held,), first_try = await self._retrying(
                _END_RETRY_S, lambda: self.store.finish([stopped], now)
            )
        except Exception:
            self._unsure.add(job_id)
            return
        self._booked.pop(job_id, None)
        if used is not None and not held and first_try:
            await self._end_booking(used)  # the lease was lost: the Release did nothing

    async def _heartbeats(self) -> None:
        """Renew every lease in flight, in one transaction per beat."""
        while True:
            await anyio.sleep(self.settings.heartbeat_s)
            live = list(self._live.items())
            if not live:
                continue
            try:
                renewed = await self._db(
                    self.store.heartbeat_all,
                    [box[0] for _, (box, _, _, _) in live],
                    self.clock.now(),
                    self.settings.lease_s,
                )
            except Exception:
                continue  # the store is away: the next beat tries again, well inside the lease
            for (job_id, (box, stage, scope, _)), lease in zip(live, renewed, strict=True):
                if job_id not in self._live:
                    continue  # finished meanwhile: its lease ended with it
                if lease is None:
                    self.stats.leases_lost += 1
                    self._emit(events.LeaseLost(job_id, stage))
                    scope.cancel()  # someone else owns the job now: stop working on it
                else:
                    box[0] = lease

    async def _watchdog(self) -> None:
        """Cancel the jobs that have run past job_timeout_s, within a quarter of it (at most a
        second, at least 50 ms) after their deadline. One sweep over the jobs in flight now and
        then: a deadline on each job's cancel scope cost a timer per job (~8 % of a no-op job)."""
        period = min(1.0, max(0.05, self.settings.job_timeout_s / 4))
        while True:
            await anyio.sleep(period)
            now = anyio.current_time()
            for _, _, scope, deadline in list(self._live.values()):
                if deadline <= now:
                    scope.cancel()

    async def _drainer(self) -> None:
        """Deliver notifications after finishes that may have written some, and now and then
        (retries of failed sends), never holding up claims."""
        while True:
            with anyio.move_on_after(self.settings.idle_poll_s * 5):
                await self._drain_wake.wait()
            self._drain_wake = anyio.Event()
            # shielded: a drain stopped halfway would leave rows claimed but unsent, held from
            # every other delivery for the claim's hold
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._drain_outbox()
            await anyio.sleep(0.2)  # at most a few drains a second, however busy

    async def _drain_outbox(self) -> None:
        if self._outbox is not None:
            await self._outbox.drain()

    # claiming -----------------------------------------------------------------------------------
    def _plan(
        self, claimed: ClaimedJob, state: Callable[[str], ModelState]
    ) -> Booking | Postpone | None:
        """What to book for a job as it is claimed (Store.claim_work calls this in its
        transaction). Stages that call no model book nothing; neither do the rare cases that
        book after the claim: count_tokens, run-scope model stages, a prompt that fails."""
        stage = self.pipeline.stage(claimed.job.stage)
        if not isinstance(stage, ModelStage) or self.settings.count_tokens:
            return None
        if stage.scope is Scope.RUN:
            return None  # its prompt needs every item: read after the claim
        idx, unblocked_at = _usable_model(stage, claimed.job.model_index, state)
        if idx is None:
            # every remaining model is parked (daily quota) or missing: wait, burn no attempt
            return Postpone(unblocked_at, "every model of the chain is parked")
        model = stage.models[idx]
        try:
            request, text = self._request(stage, claimed, model, ())
        except Exception:
            return None  # the job's own run builds it again and records the failure
        tokens, limits = self._estimator.estimate(model, text), self._limits(model)
        if limits.tpm is not None and tokens > limits.tpm:
            return None  # can never be admitted: the job's own run fails it or falls back
        self._prepared[claimed.job.id] = _Prepared(idx, request, text)
        self._planned.append(claimed.job.id)
        return Booking(model, limits, tokens)

    def _denied(self, denied: Denied) -> None:
        self._prepared.pop(denied.job.id, None)
        stage, deny, now = denied.job.stage, denied.deny, self.clock.now()
        until, reason = self._stage_hold.get(stage, (0.0, ""))
        if denied.job.model_index == 0 and (until <= now or deny.retry_at < until):
            # the earliest of the denials: a smaller request may fit before a larger one
            self._stage_hold[stage] = (deny.retry_at, deny.reason)
        self.stats.deferred += 1
        # one event per wait: denied again for the reason of a hold that has just ended is the
        # same wait going on (an in-flight limit is asked again every 50 ms)
        if reason != deny.reason or until < now - 1.0:
            self._emit(
                events.Deferred(denied.job.id, stage, denied.model, deny.reason, deny.retry_at)
            )

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
        if claimed.reservation is not None:
            self._booked[job.id] = Used(claimed.reservation, 0, sent=False)
        try:
            # one scope per job: the heartbeat cancels it when the lease is lost, the watchdog
            # when it runs past the stage's time limit
            deadline = anyio.current_time() + self.settings.job_timeout_s
            with anyio.CancelScope() as scope:
                self._live[job.id] = (lease_box, job.stage, scope, deadline)
                # every exception is handled in here: one job's trouble (a lost lease, a store
                # error, a bug) must never escape and take the dispatcher down
                try:
                    await self._run_stage(claimed, lease_box)
                except Exception as exc:
                    await self._crashed(claimed, lease_box[0], exc)
            # the watchdog cancels only past the deadline (a lease lost after it ends the
            # same way: the failure it records then finds the lease gone and changes nothing)
            if scope.cancelled_caught and anyio.current_time() >= deadline:
                await self._crashed(claimed, lease_box[0], TimeoutError())
        except anyio.get_cancelled_exc_class():
            # the dispatcher is stopping: hand the job back now rather than after the lease
            with anyio.CancelScope(shield=True):
                await self._hand_back(job.id, lease_box[0])
            raise
        finally:
            self._live.pop(job.id, None)
            self._prepared.pop(job.id, None)
            used = self._booked.pop(job.id, None)
            if used is not None and job.id not in self._unsure:
                await self._end_booking(used)
            self._unsure.discard(job.id)
            self._in_flight -= 1
            self._ended += 1
            self._wake.set()

    async def _finish(self, done: Finish) -> bool:
        """Queue `done` for the next group commit and wait for it; False if the lease was lost."""
        # no more heartbeats: the job is being finished (a renewal racing the commit would
        # find it no longer running and call the lease lost)
        live = self._live.pop(done.lease.job_id, None)
        if self._batch_written is None:
            self._batch_written = anyio.Event()
        pending = _Pending(done, self._batch_written)
        self._pending.append(pending)
        self._flush_wake.set()
        try:
            await pending.written.wait()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                if pending in self._pending:  # not taken yet (the flusher is stopping too)
                    await self._flush()
                await pending.written.wait()
            raise
        if pending.error is not None:
            if done.used is not None:  # not known to be written: still this job's to end
                self._booked[done.lease.job_id] = done.used
                self._unsure.add(done.lease.job_id)
            raise pending.error
        if done.used is not None:
            self._booked.pop(done.lease.job_id, None)  # the store has it (or, lease lost, _flush)
        if not pending.held:
            self.stats.leases_lost += 1
            self._emit(events.LeaseLost(done.lease.job_id, live[1] if live else ""))
        return pending.held

    async def _run_stage(self, claimed: ClaimedJob, lease_box: list[Lease]) -> None:
        stage = self.pipeline.stage(claimed.job.stage)
        if isinstance(stage, TaskStage):
            await self._run_task(stage, claimed, lease_box)
        else:
            await self._run_model(stage, claimed, lease_box)

    async def _crashed(self, claimed: ClaimedJob, lease: Lease, exc: Exception) -> None:
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
            used = self._booked.pop(claimed.job.id, None)  # ended with the failure if it holds
            await self._record_failure(claimed, lease, models, error, self.clock.now(), model, used)
        except Exception as again:
            self.stats.store_errors += 1
            self._emit(
                events.JobCrashed(
                    claimed.job.id,
                    claimed.job.stage,
                    f"{error.message}; recording it failed: {again}",
                )
            )

    async def _context(self, claimed: ClaimedJob, model: str | None) -> StageContext:
        stage = self.pipeline.stage(claimed.job.stage)
        items = await self._db(self.store.items, claimed.run.id) if stage.scope is Scope.RUN else ()
        return _context(claimed, stage.name, model, items)

    async def _run_task(
        self, stage: TaskStage, claimed: ClaimedJob, lease_box: list[Lease]
    ) -> None:
        started = self.clock.now()
        try:
            output = await stage.run(await self._context(claimed, None))
        except Exception as exc:  # a handler's bug must not kill the dispatcher
            error = (
                exc if isinstance(exc, CallError) else HandlerError(f"{type(exc).__name__}: {exc}")
            )
            await self._record_failure(claimed, lease_box[0], (), error, started, None)
            return
        if (unstorable := _unstorable(output)) is not None:
            bad = HandlerError(unstorable)
            await self._record_failure(claimed, lease_box[0], (), bad, started, None)
            return
        result = AttemptResult(started_at=started, finished_at=self.clock.now())
        if await self._finish(Completion(lease_box[0], result, output)):
            self.stats.succeeded += 1
            self._emit(
                events.CallSucceeded(
                    claimed.job.id, stage.name, None, False, 0, 0, result.finished_at - started
                )
            )

    async def _run_model(
        self, stage: ModelStage, claimed: ClaimedJob, lease_box: list[Lease]
    ) -> None:
        prepared = self._prepared.pop(claimed.job.id, None)
        booking = claimed.reservation
        if booking is None:
            got = await self._book_now(stage, claimed, lease_box)
            if got is None:
                return
            prepared, booking = got
        elif prepared is None:  # booked by another dispatcher's plan: build the request here
            request, text = self._request(stage, claimed, booking.model, ())
            prepared = _Prepared(stage.models.index(booking.model), request, text)
        job = claimed.job
        if prepared.model_index != job.model_index:
            self._emit(
                events.FellBack(
                    job.id,
                    stage.name,
                    stage.models[job.model_index],
                    stage.models[prepared.model_index],
                    "model unavailable",
                )
            )
            job = replace(job, model_index=prepared.model_index, model_failures=0)
            claimed = replace(claimed, job=job)
        model, request = booking.model, prepared.request
        started = self.clock.now()
        if self._local_blocks.get(model, 0.0) > started:
            # a 429 on this model came back since the claim: don't send; the next claim plans
            # with the block in the store (a fallback, or a wait)
            unsent = Used(booking, 0, sent=False)
            await self._finish(Release(lease_box[0], started, f"{model} is blocked", unsent))
            self.stats.deferred += 1
            return
        # from here the request may leave: counted as booked unless a finish says otherwise
        self._booked[job.id] = Used(booking, booking.tokens)
        try:
            response = await self._adapters[model].generate(request)
            output = stage.parse(response)
            if (unstorable := _unstorable(output)) is not None:
                raise InvalidOutput(unstorable)  # e.g. NaN: retried, as any bad output is
        except CallError as exc:
            used = Used(booking, booking.tokens, _sent_at(started, exc.send_delay_s))
            await self._record_failure(
                claimed, lease_box[0], stage.models, exc, started, model, used
            )
            return
        except (TypeError, ValueError, AttributeError) as exc:  # an adapter broke its contract
            bad = HandlerError(f"adapter for {model} failed: {type(exc).__name__}: {exc}")
            used = Used(booking, booking.tokens)
            await self._record_failure(
                claimed, lease_box[0], stage.models, bad, started, model, used
            )
            return
        await self._succeed(
            stage, claimed, lease_box[0], booking, response, output, started, prepared
        )

    async def _book_now(
        self, stage: ModelStage, claimed: ClaimedJob, lease_box: list[Lease]
    ) -> tuple[_Prepared, Reservation] | None:
        """Book a job's call after its claim (count_tokens, run-scope stages, or a prompt the
        plan could not build); None if the job was handed back or failed instead."""
        while True:
            now = self.clock.now()
            state = functools.partial(_state_at, self.store, now)
            idx, unblocked_at = await self._db(_usable_model, stage, claimed.job.model_index, state)
            if idx is None:
                reason = "every model of the chain is parked"
                await self._finish(Release(lease_box[0], unblocked_at, reason))
                self.stats.deferred += 1
                return None
            model = stage.models[idx]
            items = (
                await self._db(self.store.items, claimed.run.id) if stage.scope is Scope.RUN else ()
            )
            try:
                request, text = self._request(stage, claimed, model, items)
            except Exception as exc:
                failure = HandlerError(f"building the prompt failed: {exc}")
                await self._record_failure(claimed, lease_box[0], stage.models, failure, now, model)
                return None
            counted = await self._count_tokens(request, text)
            tokens = self._estimator.estimate(model, text, counted=counted)
            now = self.clock.now()  # book as late as possible: the provider counts the arrival
            try:
                booking = await self._db(
                    self.store.reserve, model, self._limits(model), tokens, now
                )
            except RequestTooLarge as exc:
                too_big = TooLarge(str(exc))
                await self._record_failure(claimed, lease_box[0], stage.models, too_big, now, model)
                return None
            if isinstance(booking, Deny) and booking.reason == "rpd":
                # our own ledger says the day is spent: park the model as a provider 429 would,
                # and let the chain's next model take the job now instead of waiting for midnight
                await self._db(self.store.block_model, model, booking.retry_at, "day")
                self._emit(
                    events.Deferred(claimed.job.id, stage.name, model, "rpd", booking.retry_at)
                )
                continue
            if isinstance(booking, Deny):
                self._denied(Denied(claimed.job, model, booking))
                reason = f"waiting for {model} quota ({booking.reason})"
                await self._finish(Release(lease_box[0], booking.retry_at, reason))
                return None
            return _Prepared(idx, request, text, counted), booking

    def _request(
        self, stage: ModelStage, claimed: ClaimedJob, model: str, items: Any
    ) -> tuple[ModelRequest, str]:
        prompt = stage.prompt(_context(claimed, stage.name, model, items))
        request = ModelRequest(
            model=model,
            prompt=prompt.text,
            system=prompt.system,
            output_schema=stage.output_schema(),
            temperature=stage.temperature,
            max_output_tokens=stage.max_output_tokens,
        )
        return request, (prompt.system or "") + prompt.text

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

    async def _succeed(
        self,
        stage: ModelStage,
        claimed: ClaimedJob,
        lease: Lease,
        booking: Reservation,
        response: ModelResponse,
        output: JSON,
        started: float,
        prepared: _Prepared,
    ) -> None:
        usage = response.usage
        self._estimator.observe(booking.model, prepared.text, usage.input_tokens, prepared.counted)
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
        # a reply that counts no input tokens (usage missing) keeps its reservation: refunding
        # it all would let the window take more than the provider will count
        charged = usage.input_tokens if usage.input_tokens > 0 else booking.tokens
        used = Used(booking, charged, _sent_at(started, response.send_delay_s))
        held = await self._finish(Completion(lease, result, output, used))
        if charged < booking.tokens:
            self._refunded(booking.model)
        if not held:
            return
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

    def _refunded(self, model: str) -> None:
        """A call used fewer tokens than it reserved: a stage held for TPM may fit now."""
        for stage in self.pipeline.stages:
            hold = self._stage_hold.get(stage.name)
            if hold is not None and hold[1] == "tpm" and model in getattr(stage, "models", ()):
                del self._stage_hold[stage.name]

    async def _record_failure(
        self,
        claimed: ClaimedJob,
        lease: Lease,
        models: tuple[str, ...],
        error: CallError,
        started: float,
        model: str | None,
        used: Used | None = None,
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
        outcome = decision.outcome
        counted = not isinstance(outcome, Retry) or outcome.counted
        result = AttemptResult(
            started_at=started,
            finished_at=now,
            model=model,
            is_fallback=job.model_index > 0,
            input_tokens=used.tokens if used else 0,
            status_code=error.status_code,
            error_kind=error.kind.value,
            error_message=error.message[:2000],
            counted=counted,
        )
        block: ModelBlock | None = decision.block
        if block is not None:  # jobs claimed before the store knows it must not send
            self._local_blocks[block.model] = max(
                self._local_blocks.get(block.model, 0.0), block.until
            )
        if not await self._finish(Failure(lease, result, outcome, used, block)):
            return
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
        return self._model_limits.get(model or "", _UNLIMITED)


_UNLIMITED = ModelLimits()
_END_RETRY_S = 0.3  # a job's last writes as it ends (three tries): the dispatcher may be stopping


def _limits_by_model(
    pipeline: Pipeline, limits: Mapping[str, ModelLimits]
) -> dict[str, ModelLimits]:
    """Each model of the pipeline's chains: its own limits, else the `default` entry's. With
    no limits at all every model is unlimited (tests, a local model); with some, a model left
    out is refused: most often a fallback forgotten, which would be sent as fast as it can go."""
    default = limits.get(DEFAULT_KEY)
    models = sorted(pipeline.model_names)
    if limits and default is None and (missing := [m for m in models if m not in limits]):
        raise ConfigError(
            f"no limits for {', '.join(map(repr, missing))} (pipeline {pipeline.name!r}); "
            f"give each its ModelLimits, a {DEFAULT_KEY!r} entry for every model not listed, "
            "or ModelLimits() to run one unlimited"
        )
    return {m: limits.get(m, default or _UNLIMITED) for m in models}


_COUNT_CACHE_SIZE = 10_000


def _context(claimed: ClaimedJob, stage: str, model: str | None, items: Any) -> StageContext:
    return StageContext(
        run=claimed.run,
        item=claimed.item,
        stage=stage,
        attempt=claimed.job.attempts + 1,
        model=model,
        items=items,
        lease=claimed.lease,
    )


def _state_at(store: Store, now: float, model: str) -> ModelState:
    return store.model_state(model, now)


def _usable_model(
    stage: ModelStage, start: int, state: Callable[[str], ModelState]
) -> tuple[int | None, float]:
    """Skip models parked for the day or not found; wait out short cool-downs instead.

    Returns the model index to use, or None and when the first skipped model frees up.
    """
    unblocked_at = float("inf")
    for idx in range(start, len(stage.models)):
        found = state(stage.models[idx])
        if found.reason not in ("day", "not_found"):
            return idx, 0.0
        unblocked_at = min(unblocked_at, found.blocked_until)
    return None, unblocked_at


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


def _unstorable(output: JSON) -> str | None:
    """Why a stage's output cannot be kept by every store (a SQL store would refuse it at the
    commit, failing the finish of every job written with it), or None."""
    why = unstorable(output)
    return None if why is None else f"the stage's output {why}"


def _sent_at(started: float, send_delay_s: float | None) -> float | None:
    """When the call left, on the dispatcher's clock, if the adapter saw it leave."""
    return None if send_delay_s is None else started + max(0.0, send_delay_s)
