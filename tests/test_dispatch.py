"""The dispatcher over the in-memory store and the scripted adapter, on a fake clock."""

from __future__ import annotations

import contextvars
import json
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from llm_batch_queue import events
from llm_batch_queue.adapters.base import ModelRequest, ModelResponse
from llm_batch_queue.adapters.scripted import ScriptedAdapter
from llm_batch_queue.clock import FakeClock
from llm_batch_queue.dispatch import Dispatcher, DispatcherSettings
from llm_batch_queue.errors import (
    ConfigError,
    InvalidOutput,
    ModelNotFound,
    PermanentError,
    QuotaScope,
    RateLimited,
    TransientError,
)
from llm_batch_queue.jobs import Item, ItemStatus, JobStatus, Lease, NewItem, RunStatus, Scope
from llm_batch_queue.limits import Deny, ModelLimits
from llm_batch_queue.notify import MemoryTransport, Message, OutboxDelivery
from llm_batch_queue.pipeline import ModelStage, Pipeline, Prompt, StageContext, TaskStage
from llm_batch_queue.retry import RetryPolicy
from llm_batch_queue.store import MemoryStore, Store
from llm_batch_queue.store.base import Claim, Finish
from llm_batch_queue.store.milestones import KINDS

pytestmark = pytest.mark.anyio

inserted: list[str] = []


async def insert(ctx: StageContext) -> dict[str, str]:
    inserted.append(ctx.item.key if ctx.item else "")
    return {"inserted": ctx.output("structure")}


async def summarize(ctx: StageContext) -> dict[str, int]:
    return {
        "items": len(ctx.items),
        "completed": sum(i.status is ItemStatus.COMPLETED for i in ctx.items),
    }


def make_pipeline(max_attempts: int = 3) -> Pipeline:
    return Pipeline(
        "test",
        (
            ModelStage(
                "analyze",
                ("pro", "flash"),
                lambda c: Prompt(f"analyze {c.payload}"),
                max_attempts=max_attempts,
            ),
            ModelStage(
                "structure",
                ("flash",),
                lambda c: Prompt(f"structure {c.output('analyze')}"),
                after=("analyze",),
                max_attempts=max_attempts,
            ),
            TaskStage("insert", insert, after=("structure",)),
            TaskStage("summary", summarize, scope=Scope.RUN),
        ),
        notify=KINDS,
    )


def setup(
    items: int,
    adapter: ScriptedAdapter,
    limits: dict[str, ModelLimits] | None = None,
    max_attempts: int = 3,
) -> tuple[MemoryStore, Dispatcher, str, FakeClock]:
    inserted.clear()
    clock = FakeClock()
    store = MemoryStore()
    pipeline = make_pipeline(max_attempts)
    run = store.create_run(
        pipeline="test",
        name="upload.csv",
        stages=pipeline.specs,
        items=[NewItem(f"b{i}", i) for i in range(items)],
        meta={},
        now=clock.now(),
        notify=pipeline.notify,
    )
    dispatcher = Dispatcher(
        store,
        pipeline,
        adapter,
        limits=limits,
        clock=clock,
        retry=RetryPolicy(jitter=0.0),
        settings=DispatcherSettings(concurrency=4),
    )
    return store, dispatcher, run.id, clock


async def test_a_clean_run_completes_every_stage_and_runs_the_run_stage_once() -> None:
    store, dispatcher, run_id, _ = setup(5, ScriptedAdapter())
    stats = await dispatcher.run_until_idle()
    assert store.get_run(run_id).status is RunStatus.COMPLETED
    assert sorted(inserted) == [f"b{i}" for i in range(5)]
    summary = next(j for j in store.jobs(run_id) if j.stage == "summary")
    assert summary.output == {"items": 5, "completed": 5}
    assert stats.succeeded == 16 and stats.provider_429 == 0
    items = {i.key: i for i in store.items(run_id)}
    assert items["b3"].outputs["structure"].startswith("echo") or items["b3"].outputs["structure"]


async def test_day_quota_429_parks_the_primary_and_falls_back_at_once() -> None:
    adapter = ScriptedAdapter(
        {"pro": [RateLimited("day", scope=QuotaScope.DAY, quota_id="GenerateRequestsPerDay")]}
    )
    store, dispatcher, run_id, clock = setup(3, adapter)
    start = clock.now()
    stats = await dispatcher.run_until_idle()
    assert store.get_run(run_id).status is RunStatus.COMPLETED
    assert len(adapter.calls_to("pro")) == 1  # parked after the first 429: never asked again
    assert len(adapter.calls_to("flash")) == 3 + 3  # all analyze calls fell back, plus structure
    assert stats.provider_429 == 1 and stats.fallbacks == 3
    assert clock.now() - start < 60  # nobody waited for the Pacific midnight reset
    assert store.model_state("pro", clock.now()).reason == "day"
    analyze = [a for a in store.attempts(run_id) if a.stage == "analyze"]
    assert [a.result.counted for a in analyze if a.result.error_kind] == [False]


async def test_404_on_the_primary_moves_to_the_next_model() -> None:
    adapter = ScriptedAdapter({"pro": [ModelNotFound("models/pro is not found", status_code=404)]})
    store, dispatcher, run_id, _ = setup(2, adapter)
    await dispatcher.run_until_idle()
    assert store.get_run(run_id).status is RunStatus.COMPLETED
    assert len(adapter.calls_to("pro")) == 1
    failed = [a for a in store.attempts(run_id) if a.result.error_kind]
    assert [(a.result.model, a.result.status_code) for a in failed] == [("pro", 404)]


async def test_retry_exhaustion_marks_the_item_for_reupload_with_the_reason() -> None:
    adapter = ScriptedAdapter({"flash": [InvalidOutput("truncated JSON")] * 3})
    store, dispatcher, run_id, _ = setup(1, adapter, max_attempts=3)
    transport = MemoryTransport()

    async def compose(note: object) -> Message:
        return Message(("ops@example.org",), json.dumps([note.kind, note.key]), "")  # type: ignore[attr-defined]

    dispatcher._outbox = OutboxDelivery(store, transport, compose, clock=dispatcher.clock)
    await dispatcher.run_until_idle()
    item = store.items(run_id)[0]
    assert item.status is ItemStatus.NEEDS_REUPLOAD
    assert item.error == "structure: gave up after 3 attempts: truncated JSON"
    jobs = {j.stage: j.status for j in store.jobs(run_id)}
    assert jobs == {
        "analyze": JobStatus.SUCCEEDED,
        "structure": JobStatus.FAILED,
        "insert": JobStatus.CANCELLED,
        "summary": JobStatus.SUCCEEDED,
    }
    assert inserted == []
    assert store.get_run(run_id).status is RunStatus.COMPLETED_WITH_FAILURES
    subjects = [json.loads(m.subject) for m in transport.sent]
    assert ["item_failed", "b0#1"] in subjects and ["run_finished", ""] in subjects
    assert subjects.count(["stage_complete", "structure"]) == 1


async def test_permanent_errors_give_up_without_retrying() -> None:
    adapter = ScriptedAdapter({"pro": [PermanentError("API key not valid", status_code=400)]})
    store, dispatcher, run_id, _ = setup(1, adapter)
    await dispatcher.run_until_idle()
    assert len(adapter.calls) == 1
    assert store.items(run_id)[0].error == "analyze: permanent error: API key not valid"


async def test_transient_errors_back_off_then_fall_back() -> None:
    adapter = ScriptedAdapter({"pro": [TransientError("503", status_code=503)] * 2})
    store, dispatcher, run_id, _ = setup(1, adapter, max_attempts=5)
    await dispatcher.run_until_idle()
    analyze = [a.result for a in store.attempts(run_id) if a.stage == "analyze"]
    assert [(r.model, r.error_kind) for r in analyze] == [
        ("pro", "transient"),
        ("pro", "transient"),
        ("flash", None),
    ]
    assert analyze[1].started_at - analyze[0].finished_at >= 2.0  # the backoff was waited out
    assert store.get_run(run_id).status is RunStatus.COMPLETED


async def test_rpm_limit_holds_and_task_stages_reserve_no_quota() -> None:
    adapter = ScriptedAdapter()
    limits = {"pro": ModelLimits(rpm=4, window_margin_s=0.0), "flash": ModelLimits(rpm=100)}
    store, dispatcher, run_id, clock = setup(12, adapter, limits)
    start = clock.now()
    stats = await dispatcher.run_until_idle()
    assert store.get_run(run_id).status is RunStatus.COMPLETED
    starts = sorted(a.result.started_at for a in store.attempts(run_id) if a.result.model == "pro")
    assert len(starts) == 12
    for i in range(len(starts) - 4):
        assert starts[i + 4] - starts[i] >= 60.0  # never 5 calls inside one 60 s window
    assert clock.now() - start >= 120.0
    assert stats.deferred > 0 and stats.provider_429 == 0
    # insert/summary never touched the ledger: only model names were booked
    assert {a.result.model for a in store.attempts(run_id) if a.stage in ("insert", "summary")} == {
        None
    }


async def test_a_default_entry_limits_the_models_not_listed() -> None:
    # flash (analyze's fallback and structure's model) has no entry of its own
    limits = {"pro": ModelLimits(rpm=100), "default": ModelLimits(rpm=4, window_margin_s=0.0)}
    store, dispatcher, run_id, _ = setup(6, ScriptedAdapter(), limits)
    await dispatcher.run_until_idle()
    assert store.get_run(run_id).status is RunStatus.COMPLETED
    attempts = store.attempts(run_id)
    starts = sorted(a.result.started_at for a in attempts if a.result.model == "flash")
    assert len(starts) == 6
    assert starts[4] - starts[0] >= 60.0  # never 5 calls inside one 60 s window


def test_limits_that_leave_out_a_model_of_the_pipeline_are_refused() -> None:
    """A fallback forgotten in the limits used to run unlimited, silently (new user's trial)."""
    with pytest.raises(ConfigError) as caught:
        setup(1, ScriptedAdapter(), {"pro": ModelLimits(rpm=100)})
    assert str(caught.value) == (
        "no limits for 'flash' (pipeline 'test'); give each its ModelLimits, a 'default' entry "
        "for every model not listed, or ModelLimits() to run one unlimited"
    )
    setup(1, ScriptedAdapter(), {"pro": ModelLimits(rpm=100), "flash": ModelLimits()})  # said so
    setup(1, ScriptedAdapter(), None)  # no limits at all: every model unlimited


def test_a_model_listed_twice_in_a_chain_is_refused() -> None:
    with pytest.raises(ConfigError, match="a model is listed twice"):
        Pipeline("p", (ModelStage("s", ("m", "m"), lambda c: Prompt("q")),))


async def test_run_once_respects_max_jobs_and_leaves_the_rest_for_the_next_tick() -> None:
    store, dispatcher, run_id, _ = setup(5, ScriptedAdapter())
    stats = await dispatcher.run_once(max_jobs=3)
    assert stats.claimed == 3
    done = [j for j in store.jobs(run_id) if j.status is JobStatus.SUCCEEDED]
    assert len(done) == 3
    assert store.get_run(run_id).status is RunStatus.RUNNING
    await dispatcher.run_once()
    await dispatcher.run_until_idle()
    assert store.get_run(run_id).status is RunStatus.COMPLETED


async def test_run_once_does_not_wait_for_backoffs() -> None:
    adapter = ScriptedAdapter({"pro": [TransientError("503", status_code=503)]})
    store, dispatcher, run_id, clock = setup(1, adapter)
    start = clock.now()
    await dispatcher.run_once(time_budget_s=30)
    job = next(j for j in store.jobs(run_id) if j.stage == "analyze")
    assert job.status is JobStatus.READY and job.next_run_at > clock.now()
    assert clock.now() - start < 2.0  # returned instead of sleeping through the backoff


async def test_our_own_day_limit_sends_work_to_the_fallback_instead_of_waiting() -> None:
    adapter = ScriptedAdapter()
    limits = {"pro": ModelLimits(rpd=2), "flash": ModelLimits(rpm=100)}
    store, dispatcher, run_id, clock = setup(5, adapter, limits)
    start = clock.now()
    stats = await dispatcher.run_until_idle()
    assert store.get_run(run_id).status is RunStatus.COMPLETED
    assert len(adapter.calls_to("pro")) == 2  # the day's budget, then never again
    assert stats.fallbacks == 3 and stats.provider_429 == 0
    assert clock.now() - start < 60  # nobody waited for the provider's midnight
    assert store.model_state("pro", clock.now()).reason == "day"


@pytest.mark.parametrize("sql", [False, True])
async def test_a_dispatcher_runs_only_its_own_pipelines_jobs(sql: bool, tmp_path: Path) -> None:
    from llm_batch_queue.store.sql import SQLStore

    store: Store = SQLStore(f"sqlite:///{tmp_path / 'q.db'}") if sql else MemoryStore()
    clock = FakeClock()
    mine, other = make_pipeline(), Pipeline("other", make_pipeline().stages)
    runs = {
        p.name: store.create_run(
            pipeline=p.name,
            name=p.name,
            stages=p.specs,
            items=[NewItem("a", 1)],
            meta={},
            now=clock.now(),
        )
        for p in (mine, other)
    }
    dispatcher = Dispatcher(store, mine, ScriptedAdapter(), clock=clock)
    await dispatcher.run_until_idle()
    assert store.get_run(runs["test"].id).status is RunStatus.COMPLETED
    assert store.get_run(runs["other"].id).status is RunStatus.RUNNING
    assert {j.status for j in store.jobs(runs["other"].id)} == {JobStatus.READY, JobStatus.PENDING}


async def test_run_until_idle_can_stop_when_one_run_has_finished() -> None:
    adapter = ScriptedAdapter({"pro": [TransientError("503")]})
    store, dispatcher, first, clock = setup(1, adapter)
    pipeline = dispatcher.pipeline
    second = store.create_run(
        pipeline=pipeline.name,
        name="later",
        stages=pipeline.specs,
        items=[NewItem("x", 1)],
        meta={},
        now=clock.now() + 3600,
    )
    # the second run's first job is only due in an hour: waiting for it is not our business
    for job in store.jobs(second.id):
        assert job.next_run_at >= clock.now() + 3600 or job.status is JobStatus.PENDING
    await dispatcher.run_until_idle(run_id=first)
    assert store.get_run(first).status is RunStatus.COMPLETED
    assert store.get_run(second.id).status is RunStatus.RUNNING


class BrokenAdapter(ScriptedAdapter):
    """Breaks the adapter contract: raises something that is not a CallError."""

    async def generate(self, request: ModelRequest) -> ModelResponse:
        raise ValueError("adapter bug")


async def test_an_adapter_that_breaks_its_contract_fails_the_job_not_the_dispatcher() -> None:
    store, dispatcher, run_id, _ = setup(2, BrokenAdapter(), max_attempts=2)
    stats = await dispatcher.run_until_idle()
    assert stats.gave_up == 2
    errors = {i.error for i in store.items(run_id)}
    assert errors == {
        "analyze: gave up after 2 attempts: adapter for pro failed: ValueError: adapter bug"
    }


async def test_a_lost_lease_is_counted_and_the_dispatcher_carries_on() -> None:
    store, dispatcher, run_id, clock = setup(1, ScriptedAdapter())
    original = store.complete

    stolen: list[str] = []

    def steal_then_complete(lease: Lease, *args: object) -> None:
        if not stolen:  # the first job only: the run's own summary job then runs as usual
            stolen.append(lease.job_id)
            store.skip_item(run_id, "b0", "taken away", clock.now())  # the lease is gone now
        original(lease, *args)  # type: ignore[arg-type]

    store.complete = steal_then_complete  # type: ignore[method-assign]
    stats = await dispatcher.run_until_idle()
    assert stats.leases_lost == 1
    assert store.items(run_id)[0].error == "skipped: taken away"


async def test_a_hung_task_times_out_and_is_retried_as_transient() -> None:
    clock = FakeClock()
    store = MemoryStore()

    async def hang(ctx: StageContext) -> None:
        await anyio.sleep_forever()

    pipeline = Pipeline("hang", (TaskStage("t", hang, max_attempts=1),))
    run = store.create_run(
        pipeline="hang",
        name="n",
        stages=pipeline.specs,
        items=[NewItem("a", 1)],
        meta={},
        now=clock.now(),
    )
    dispatcher = Dispatcher(
        store, pipeline, clock=clock, settings=DispatcherSettings(job_timeout_s=0.2)
    )
    await dispatcher.run_until_idle()
    assert (
        store.items(run.id)[0].error
        == "t: gave up after 1 attempts: stage did not finish within 0.2 s"
    )


@pytest.mark.parametrize("share", [0.9, 1.0, 1.05])
async def test_a_task_ending_about_its_time_limit_is_recorded_once(share: float) -> None:
    # the watchdog and the job's own finish race here: one attempt each, whichever wins
    store = MemoryStore()

    async def near(ctx: StageContext) -> str:
        await anyio.sleep(0.2 * share)
        return "ok"

    pipeline = Pipeline("near", (TaskStage("t", near, max_attempts=1),))
    items = [NewItem(str(i), i) for i in range(20)]
    run = store.create_run(
        pipeline="near", name="n", stages=pipeline.specs, items=items, meta={}, now=0.0
    )
    dispatcher = Dispatcher(store, pipeline, settings=DispatcherSettings(job_timeout_s=0.2))
    with anyio.fail_after(20):
        await dispatcher.run_until_idle()
    per_job = Counter(a.job_id for a in store.attempts(run.id))
    assert len(per_job) == 20 and set(per_job.values()) == {1}
    assert all(j.status.settled for j in store.jobs(run.id))


async def test_work_released_while_the_next_due_time_is_read_is_not_missed() -> None:
    # a job finished, releasing its item's next stage, while the dispatcher asked the store when
    # work is next due; the answer (the finished job's own lease expiry, a minute away) was past
    # max_wait_s, and run_until_idle returned with the next stage ready (found flaky in CI)
    class SlowToAnswer(MemoryStore):
        def next_due(self, *args: Any, **kwargs: Any) -> float | None:
            due = super().next_due(*args, **kwargs)
            time.sleep(0.3)  # the running job ends meanwhile
            return due

    async def first(ctx: StageContext) -> str:
        await anyio.sleep(0.05)
        return "a"

    async def second(ctx: StageContext) -> str:
        return "b"

    store = SlowToAnswer()
    pipeline = Pipeline("two", (TaskStage("a", first), TaskStage("b", second, after=("a",))))
    run = store.create_run(
        pipeline="two", name="n", stages=pipeline.specs, items=[NewItem("x", 1)], meta={},
        now=time.time(),
    )  # fmt: skip
    settings = DispatcherSettings(store_in_thread=True, lease_s=60)
    with anyio.fail_after(10):
        await Dispatcher(store, pipeline, settings=settings).run_until_idle(max_wait_s=5)
    assert store.get_run(run.id).status is RunStatus.COMPLETED


def test_stopping_while_finishes_wait_for_an_unreachable_store_does_not_hang() -> None:
    # found by a new user's Ctrl-C: the flusher, cancelled while it waited to retry a batch,
    # left that batch's jobs waiting (shielded) for it forever. In a thread of its own, so a
    # hang fails the test instead of hanging it
    class Unreachable(MemoryStore):
        def finish(self, batch: Sequence[Finish], now: float) -> list[bool]:
            raise ConnectionError("the database is restarting")

    async def noop(ctx: StageContext) -> str:
        return "ok"

    store = Unreachable()
    pipeline = Pipeline("down", (TaskStage("t", noop),))
    store.create_run(
        pipeline="down", name="n", stages=pipeline.specs,
        items=[NewItem(str(i), i) for i in range(3)], meta={}, now=0.0,
    )  # fmt: skip
    dispatcher = Dispatcher(store, pipeline, settings=DispatcherSettings(store_retry_s=60))

    async def stop_while_retrying() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(dispatcher.run_until_idle)
            while dispatcher.stats.store_errors < 2:  # the flusher is retrying
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()

    thread = threading.Thread(target=anyio.run, args=(stop_while_retrying,), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the dispatcher did not stop"
    assert dispatcher.stats.succeeded == 0


async def test_stopping_the_dispatcher_hands_in_flight_jobs_back() -> None:
    store = MemoryStore()
    started = anyio.Event()

    async def slow(ctx: StageContext) -> None:
        started.set()
        await anyio.sleep_forever()

    pipeline = Pipeline("slow", (TaskStage("t", slow),))
    run = store.create_run(
        pipeline="slow", name="n", stages=pipeline.specs, items=[NewItem("a", 1)], meta={}, now=0.0
    )
    dispatcher = Dispatcher(store, pipeline)
    async with anyio.create_task_group() as tg:
        tg.start_soon(dispatcher.run_until_idle)
        await started.wait()
        tg.cancel_scope.cancel()
    (job,) = store.jobs(run.id)
    assert job.status is JobStatus.READY and job.last_error == "dispatcher stopped"


@pytest.mark.parametrize("sql", [False, True])
async def test_a_small_run_created_later_is_not_starved_by_a_big_one(
    sql: bool, tmp_path: Path
) -> None:
    """One model at 4 requests a minute: a 4-item run created after a 40-item run takes turns
    with it (fair order) instead of waiting for all 40 (first come, first served)."""
    from llm_batch_queue.store.sql import SQLStore

    finished: list[tuple[str, str]] = []

    async def done(ctx: StageContext) -> None:
        assert ctx.item is not None
        finished.append((ctx.run.name, ctx.item.key))

    pipeline = Pipeline(
        "fair",
        (
            ModelStage("ask", ("m",), lambda c: Prompt(f"ask {c.payload}")),
            TaskStage("done", done, after=("ask",)),
        ),
    )
    clock = FakeClock()
    store: Store = SQLStore(f"sqlite:///{tmp_path / 'q.db'}") if sql else MemoryStore()

    def create(name: str, n: int) -> str:
        items = [NewItem(f"{name[0]}{i}", i) for i in range(n)]
        run = store.create_run(
            pipeline="fair",
            name=name,
            stages=pipeline.specs,
            items=items,
            meta={},
            now=clock.now(),
        )
        return run.id

    big = create("big", 40)
    dispatcher = Dispatcher(
        store,
        pipeline,
        ScriptedAdapter(),
        limits={"m": ModelLimits(rpm=4, window_margin_s=0.0)},
        clock=clock,
        retry=RetryPolicy(jitter=0.0),
        settings=DispatcherSettings(concurrency=4),
    )
    await dispatcher.run_once()  # the first minute's 4 calls; the rest wait for the window
    assert finished == [("big", f"b{i}") for i in range(4)]
    clock.advance(10)
    small = create("small", 4)
    await dispatcher.run_until_idle()
    assert store.get_run(big).status is store.get_run(small).status is RunStatus.COMPLETED
    # each run's items finish in order
    assert [k for r, k in finished if r == "big"] == [f"b{i}" for i in range(40)]
    assert [k for r, k in finished if r == "small"] == [f"s{i}" for i in range(4)]
    # the small run finished while most of the big one was still queued
    last_small = max(i for i, (r, _) in enumerate(finished) if r == "small")
    # in fair order b0..b11 (keys up to s3's, 11) go before s3: 12, and a little slack; first
    # come, first served put 20 here (the big run's deferred calls fell behind the small run)
    assert sum(r == "big" for r, _ in finished[:last_small]) <= 14
    assert finished[-1][0] == "big"
    store.close()


async def _run_task(
    store: Store, task: Callable[[StageContext], Awaitable[object]], keys: Sequence[str]
) -> dict[str, Item]:
    """Each item, by key, once a pipeline of the one task stage `t` has run them (one attempt
    each) on `store`, which is closed then."""
    pipeline = Pipeline("p", (TaskStage("t", task, max_attempts=1),))
    new = [NewItem(k, n) for n, k in enumerate(keys)]
    run = store.create_run(pipeline="p", name="n", stages=pipeline.specs, items=new, meta={}, now=0)
    try:
        with anyio.fail_after(20):
            await Dispatcher(store, pipeline, clock=FakeClock()).run_until_idle()
        return {i.key: i for i in store.items(run.id)}
    finally:
        store.close()


@pytest.mark.parametrize("where", ["memory", "sqlite"])
async def test_an_output_that_is_not_json_fails_its_job_at_once(where: str, tmp_path: Path) -> None:
    # a SQL store refused it only at the commit, which the flusher took for an outage and
    # retried for minutes; MemoryStore kept it. Either way: a clear failure, at once
    from llm_batch_queue.store.sql import open_store

    async def odd(ctx: StageContext) -> object:
        return {"when": object()} if ctx.item and ctx.item.key == "bad" else {"ok": 1}

    store: Store = MemoryStore() if where == "memory" else open_store(f"sqlite:///{tmp_path}/q.db")
    items = await _run_task(store, odd, ["bad", "good"])
    assert items["good"].status is ItemStatus.COMPLETED
    assert items["bad"].status is ItemStatus.NEEDS_REUPLOAD
    assert "cannot be stored as JSON" in (items["bad"].error or "")


class _Reading(BaseModel):
    x: float


@pytest.mark.parametrize(
    "where", ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_outputs_postgresql_cannot_store_fail_their_own_job_only(
    where: str, request: pytest.FixtureRequest
) -> None:
    """A model's reply parsed to NaN (pydantic reads `NaN` as a float), a task's string with
    U+0000 and one with a lone surrogate (a JSON reply cut inside an emoji: "\\ud83d" parses to
    one): PostgreSQL refuses them at the commit, which failed the whole group-committed batch
    and was retried as an outage (found by adversarial trials). Every store now fails just
    those jobs, at once and saying why; the others complete. A handler's error message with
    both characters is stored escaped."""
    from llm_batch_queue.store.sql import open_store

    async def task(ctx: StageContext) -> object:
        key = ctx.item.key if ctx.item else ""
        if key == "raises":
            raise RuntimeError("broken \x00 \ud83d")
        return {"nul": "a\x00b", "cut": json.loads('{"t": "cut \\ud83d"}')}.get(key, "fine")

    pipeline = Pipeline(
        "odd",
        (
            ModelStage("m", ("m",), lambda c: Prompt(f"{c.payload} "), output_type=_Reading,
                       max_attempts=2),
            TaskStage("t", task, after=("m",), max_attempts=1),
        ),
    )  # fmt: skip
    adapter = ScriptedAdapter(
        default=lambda req: '{"x": NaN}' if req.prompt.startswith("nan ") else '{"x": 1.5}'
    )
    if where == "memory":
        store: Store = MemoryStore()
    else:
        store = open_store(request.getfixturevalue("sqlite_url" if where == "sqlite" else "pg_url"))
    run = store.create_run(
        pipeline="odd", name="n", stages=pipeline.specs,
        items=[NewItem(k, k) for k in ("nan", "nul", "cut", "raises", "ok1", "ok2")],
        meta={}, now=0.0,
    )  # fmt: skip
    dispatcher = Dispatcher(
        store, pipeline, adapter, clock=FakeClock(), settings=DispatcherSettings(concurrency=8)
    )
    try:
        with anyio.fail_after(30):
            await dispatcher.run_until_idle()
        items = {i.key: i for i in store.items(run.id)}
    finally:
        store.close()
    assert {k: i.status for k, i in items.items()} == {
        "nan": ItemStatus.NEEDS_REUPLOAD,
        "nul": ItemStatus.NEEDS_REUPLOAD,
        "cut": ItemStatus.NEEDS_REUPLOAD,
        "raises": ItemStatus.NEEDS_REUPLOAD,
        "ok1": ItemStatus.COMPLETED,
        "ok2": ItemStatus.COMPLETED,
    }
    assert "cannot be stored as JSON" in (items["nan"].error or "")
    assert "U+0000" in (items["nul"].error or "")
    assert "lone surrogate, U+D83D" in (items["cut"].error or "")
    assert "broken \\x00 \\ud83d" in (items["raises"].error or "")
    assert dispatcher.stats.store_errors == 0
    if not isinstance(store, MemoryStore):
        store.close()


# jobs run on long-lived runner tasks (dispatch._Runners): each still behaves as a task of its
# own would — its own context, and handed back when the dispatcher is cancelled mid-claim
_current_item: contextvars.ContextVar[str | None] = contextvars.ContextVar("item", default=None)


async def test_a_context_variable_one_job_sets_is_not_seen_by_the_next() -> None:
    seen: list[str | None] = []

    async def handler(ctx: StageContext) -> dict[str, bool]:
        seen.append(_current_item.get())
        assert ctx.item is not None
        _current_item.set(ctx.item.key)  # e.g. structlog's bind_contextvars
        await anyio.sleep(0)
        assert _current_item.get() == ctx.item.key  # kept across its own awaits
        return {}

    store = MemoryStore()
    pipeline = Pipeline("p", (TaskStage("t", handler),))
    items = [NewItem(f"i{k}", k) for k in range(4)]
    store.create_run(pipeline="p", name="n", stages=pipeline.specs, items=items, meta={}, now=0)
    settings = DispatcherSettings(concurrency=1)  # one runner takes every job in turn
    await Dispatcher(store, pipeline, settings=settings).run_until_idle()
    assert seen == [None] * 4


class _CancelsOnSecondClaim(MemoryStore):
    scope: anyio.CancelScope | None = None
    claims = 0

    def claim_work(self, **kwargs: Any) -> Claim:
        self.claims += 1
        claim = super().claim_work(**kwargs)
        if self.claims == 2 and claim.jobs:  # the only runner is idle, waiting for this job
            assert self.scope is not None
            anyio.from_thread.run_sync(self.scope.cancel)  # e.g. a second SIGTERM
        return claim


async def test_jobs_claimed_as_the_dispatcher_is_cancelled_are_handed_back() -> None:
    async def quick(ctx: StageContext) -> dict[str, bool]:
        await anyio.sleep(0)
        return {"ok": True}

    store = _CancelsOnSecondClaim()
    pipeline = Pipeline("p", (TaskStage("t", quick),))
    items = [NewItem(f"i{k}", k) for k in range(3)]
    run = store.create_run(
        pipeline="p", name="n", stages=pipeline.specs, items=items, meta={}, now=0
    )
    settings = DispatcherSettings(concurrency=1, claim_batch=1, store_in_thread=True)
    with anyio.CancelScope() as scope:
        store.scope = scope
        await Dispatcher(store, pipeline, settings=settings).run_until_idle()
    statuses = sorted((j.status.value, j.last_error or "") for j in store.jobs(run.id))
    # the claimed job was released at once, not left running until its lease expires
    assert statuses == [("ready", ""), ("ready", "dispatcher stopped"), ("succeeded", "")]


async def test_waiting_for_another_workers_leases_is_said_once_then_the_jobs_are_taken_over() -> (
    None
):
    clock = FakeClock()
    store = MemoryStore()
    pipeline = make_pipeline()
    run = store.create_run(
        pipeline="test", name="n", stages=pipeline.specs, items=[NewItem("a", 1)], meta={},
        now=clock.now(), notify=pipeline.notify,
    )  # fmt: skip
    (dead,) = store.claim(worker="crashed", now=clock.now(), limit=1, lease_s=60)
    seen: list[object] = []
    dispatcher = Dispatcher(
        store, pipeline, ScriptedAdapter(), clock=clock, on_event=seen.append,
        settings=DispatcherSettings(concurrency=4),
    )  # fmt: skip
    stats = await dispatcher.run_once()
    assert stats.claimed == 0
    (note,) = seen
    assert note == events.WaitingForLeases(1, dead.lease.expires_at, ending=True)
    assert isinstance(note, events.WaitingForLeases)
    at = time.strftime("%H:%M:%S", time.localtime(dead.lease.expires_at))
    assert note.explain(clock.now()) == (
        f"1 job running under other workers' leases, the first ending at {at} (in 60 s); "
        "nothing else is due, so this dispatch ends: a later one takes them over if their "
        "worker has stopped"
    )
    staying = events.WaitingForLeases(2, dead.lease.expires_at).explain(clock.now())
    assert staying == (
        "2 jobs running under other workers' leases; if their worker has stopped, they are "
        f"taken over when the leases end, the first at {at} (in 60 s)"
    )
    # waiting (the fake clock jumps) says nothing more, then takes the job over and ends it
    await dispatcher.run_until_idle()
    waits = [e for e in seen if isinstance(e, events.WaitingForLeases)]
    assert len(waits) == 1
    assert store.get_run(run.id).status is RunStatus.COMPLETED
    reclaimed = [e for e in seen if isinstance(e, events.JobClaimed) and e.reclaimed]
    assert [e.job_id for e in reclaimed] == [dead.job.id]


class _Interfering(ScriptedAdapter):
    """Calls that end without their job's finish reaching the store as usual: the item is
    skipped (its lease taken) during the call, or the call hangs."""

    def __init__(self, store: Store, run_id: str, how: str) -> None:
        super().__init__()
        self.store, self.run_id, self.how, self.started = store, run_id, how, 0

    async def generate(self, request: ModelRequest) -> ModelResponse:
        self.started += 1
        if self.started == 1 and self.how.startswith("lost"):
            self.store.skip_item(self.run_id, "i0", "taken away", time.time())
            if self.how == "lost_midcall":  # the heartbeat finds the lease gone first
                await anyio.sleep(10)
        elif self.started == 1:
            await anyio.sleep(10)  # timed out, or the dispatcher is stopped meanwhile
        return await super().generate(request)


@pytest.mark.parametrize("how", ["lost_midcall", "lost_before_finish", "timeout", "stopped"])
@pytest.mark.parametrize(
    "where", ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_a_call_that_ends_without_its_finish_gives_back_its_in_flight_place(
    how: str, where: str, request: pytest.FixtureRequest
) -> None:
    """A call's booking went to the store only with its finish: a job whose lease was taken
    (an admin's skip, a stall past the lease), that timed out or was stopped mid-call kept its
    model's in-flight place for IN_FLIGHT_TTL_S (15 min), and with max_in_flight=1 nothing else
    ran meanwhile (adversarial trial). Now the booking ends with the job, however it ends."""
    from llm_batch_queue.store.sql import open_store

    store: Store = (
        MemoryStore()
        if where == "memory"
        else open_store(request.getfixturevalue("sqlite_url" if where == "sqlite" else "pg_url"))
    )
    pipeline = Pipeline("p", (ModelStage("ask", ("m",), lambda c: Prompt("q"), max_attempts=1),))
    run = store.create_run(
        pipeline="p", name="n", stages=pipeline.specs,
        items=[NewItem(f"i{k}", k) for k in range(3)], meta={}, now=time.time(),
    )  # fmt: skip
    settings = DispatcherSettings(concurrency=4, lease_s=2, heartbeat_s=0.1, job_timeout_s=0.5)
    limits = {"m": ModelLimits(max_in_flight=1)}
    adapter = _Interfering(store, run.id, how)
    dispatcher = Dispatcher(store, pipeline, adapter, limits=limits, settings=settings)
    try:
        with anyio.fail_after(8):
            if how == "stopped":
                async with anyio.create_task_group() as tg:
                    tg.start_soon(dispatcher.run_until_idle)
                    while adapter.started == 0:
                        await anyio.sleep(0.01)
                    tg.cancel_scope.cancel()
                assert {j.status for j in store.jobs(run.id)} == {JobStatus.READY}
            else:
                await dispatcher.run_until_idle()
                statuses = {i.key: i.status for i in store.items(run.id)}
                assert statuses["i1"] is statuses["i2"] is ItemStatus.COMPLETED, [
                    i.error for i in store.items(run.id)
                ]
        # nothing is in flight any more: the place is free at once
        booked = store.reserve("m", ModelLimits(max_in_flight=1), 1, time.time())
        assert not isinstance(booked, Deny), booked
    finally:
        store.close()


class _FinishFailsAtFirst(MemoryStore):
    """A store whose first finishes fail, as a database away for longer than store_retry_s."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def finish(self, batch: Sequence[Finish], now: float) -> list[bool]:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("the database is away")
        return super().finish(batch, now)


async def test_a_booking_whose_finish_could_not_be_written_is_ended_with_the_failure() -> None:
    """The completion could not be written within store_retry_s; the failure recorded once the
    store was back held the lease (so nothing had been written) but not the booking, which kept
    max_in_flight=1 taken for 15 minutes (adversarial trial)."""
    store = _FinishFailsAtFirst(failures=1)  # the completion's one try (store_retry_s=0.05)
    pipeline = Pipeline("p", (ModelStage("ask", ("m",), lambda c: Prompt("q"), max_attempts=2),))
    run = store.create_run(
        pipeline="p", name="n", stages=pipeline.specs, items=[NewItem("a", 1)], meta={},
        now=time.time(),
    )  # fmt: skip
    settings = DispatcherSettings(store_retry_s=0.05, store_in_thread=False)
    dispatcher = Dispatcher(
        store, pipeline, ScriptedAdapter(), limits={"m": ModelLimits(max_in_flight=1)},
        settings=settings, retry=RetryPolicy(base_delay_s=0.0, jitter=0.0),
    )  # fmt: skip
    with anyio.fail_after(10):
        await dispatcher.run_until_idle()
    assert store.items(run.id)[0].status is ItemStatus.COMPLETED  # on its second attempt
    booked = store.reserve("m", ModelLimits(max_in_flight=1), 1, time.time())
    assert not isinstance(booked, Deny), booked


@pytest.mark.parametrize("where", ["memory", "sqlite"])
async def test_a_deeply_nested_output_is_kept_by_every_store(
    where: str, request: pytest.FixtureRequest
) -> None:
    """The memory store copied outputs with deepcopy, which recursed in Python and failed the
    whole finish batch on a list 500 deep that JSON stores keep (adversarial trial)."""
    from llm_batch_queue.store.sql import open_store

    deep: object = "bottom"
    for _ in range(500):
        deep = [deep]

    async def task(ctx: StageContext) -> object:
        return deep if ctx.item and ctx.item.key == "deep" else "ok"

    store: Store = (
        MemoryStore() if where == "memory" else open_store(request.getfixturevalue("sqlite_url"))
    )
    items = await _run_task(store, task, ["deep", "flat"])
    assert items["deep"].outputs["t"] == deep and items["flat"].outputs["t"] == "ok"
