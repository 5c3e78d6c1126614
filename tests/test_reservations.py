"""What a dispatcher reserves before a call, and how it uses what reconciliation gives back.

In-memory store, scripted adapter, fake clock: the scripted adapter charges ceil(chars / 4)
input tokens, as the simulator does, unless a scripted response says otherwise.
"""

from __future__ import annotations

import itertools

import anyio
import pytest

from llm_batch_queue.adapters.base import ModelRequest, ModelResponse, Usage
from llm_batch_queue.adapters.scripted import ScriptedAdapter
from llm_batch_queue.clock import FakeClock
from llm_batch_queue.dispatch import Dispatcher, DispatcherSettings
from llm_batch_queue.estimator import TokenEstimator
from llm_batch_queue.jobs import ItemStatus, NewItem, RunStatus
from llm_batch_queue.limits import ModelLimits
from llm_batch_queue.pipeline import ModelStage, Pipeline, Prompt
from llm_batch_queue.store import MemoryStore

pytestmark = pytest.mark.anyio

CHARS = 400  # 100 tokens as charged; the length-based estimate reserves 105


def text(i: int) -> str:
    return f"{i}:".ljust(CHARS, "x")


class CountingAdapter(ScriptedAdapter):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.counted: list[str] = []

    async def count_tokens(self, request: ModelRequest) -> int:
        self.counted.append(request.prompt)
        return await super().count_tokens(request)


def setup(
    items: int,
    adapter: ScriptedAdapter,
    tpm: int | None,
    settings: DispatcherSettings,
    rpm: int | None = None,
) -> tuple[MemoryStore, Dispatcher, str, FakeClock]:
    clock = FakeClock()
    store = MemoryStore()
    pipeline = Pipeline("reserve", (ModelStage("ask", ("m",), lambda c: Prompt(str(c.payload))),))
    run = store.create_run(
        pipeline=pipeline.name,
        name="r",
        stages=pipeline.specs,
        items=[NewItem(str(i), text(i)) for i in range(items)],
        meta={},
        now=clock.now(),
    )
    dispatcher = Dispatcher(
        store,
        pipeline,
        adapter,
        limits={"m": ModelLimits(rpm=rpm, tpm=tpm, window_margin_s=0.0)},
        clock=clock,
        settings=settings,
    )
    return store, dispatcher, run.id, clock


def starts(store: MemoryStore, run_id: str) -> list[float]:
    return sorted(a.result.started_at for a in store.attempts(run_id))


async def test_tokens_given_back_by_reconciliation_are_used_before_the_window_turns() -> None:
    clock_holder: list[FakeClock] = []

    async def sleep(seconds: float) -> None:
        await clock_holder[0].sleep(seconds)

    # every call is charged 50 tokens, far below the 105 reserved for it
    cheap = ModelResponse("ok", Usage(input_tokens=50), "m")
    adapter = ScriptedAdapter({"m": [cheap] * 6}, latency_s=1.0, sleep=sleep)
    store, dispatcher, run_id, clock = setup(6, adapter, 300, DispatcherSettings(concurrency=3))
    clock_holder.append(clock)
    start = clock.now()
    stats = await dispatcher.run_until_idle()
    assert store.get_run(run_id).status is RunStatus.COMPLETED
    # the third reservation is refused (3 x 105 > 300); once the first two are reconciled to
    # 50 each, more jobs fit at once: holding the stage until the window turned would leave
    # 200 tokens idle for a minute
    first_window = [t for t in starts(store, run_id) if t < start + 60]
    assert stats.deferred >= 1 and stats.provider_429 == 0
    assert len(first_window) > 2


async def test_count_tokens_reserves_the_providers_count_and_asks_once_per_prompt() -> None:
    adapter = CountingAdapter()
    store, dispatcher, run_id, clock = setup(
        3, adapter, 200, DispatcherSettings(concurrency=3, count_tokens=True)
    )
    start = clock.now()
    await dispatcher.run_until_idle()
    assert store.get_run(run_id).status is RunStatus.COMPLETED
    # 100 + 100 fit a budget of 200 exactly; the estimate (105 each) would not have
    assert [t - start < 60 for t in starts(store, run_id)] == [True, True, False]
    # the third job was deferred and claimed again, but its prompt was counted only once
    assert sorted(adapter.counted) == [text(i) for i in range(3)]


async def test_without_count_tokens_the_estimate_keeps_its_headroom() -> None:
    adapter = CountingAdapter()
    store, dispatcher, run_id, clock = setup(2, adapter, 200, DispatcherSettings(concurrency=2))
    start = clock.now()
    await dispatcher.run_until_idle()
    assert [t - start < 60 for t in starts(store, run_id)] == [True, False]
    assert adapter.counted == []


def test_a_count_is_scaled_up_by_what_the_provider_charged_beyond_it_never_down() -> None:
    estimator, prompt = TokenEstimator(), text(0)
    assert estimator.estimate("m", prompt) == 105  # no count: the length, with headroom
    assert estimator.estimate("m", prompt, counted=100) == 100
    estimator.observe("m", prompt, 90, counted=100)  # charged less than counted: keep the count
    assert estimator.estimate("m", prompt, counted=100) == 100
    for _ in range(20):
        estimator.observe("m", prompt, 110, counted=100)  # framing the count leaves out
    assert 109 <= estimator.estimate("m", prompt, counted=100) <= 110
    assert estimator.estimate("other", prompt, counted=100) == 100


def test_the_headroom_follows_how_far_the_estimates_have_been_off() -> None:
    steady, jumpy, prompt = TokenEstimator(), TokenEstimator(), text(0)
    assert steady.estimate("m", prompt) == jumpy.estimate("m", prompt) == 105
    for i in range(20):
        steady.observe("m", prompt, 100)  # the length predicts the count exactly
        jumpy.observe("m", prompt, 80 if i % 2 else 120)  # off by a fifth either way
    assert steady.estimate("m", prompt) == 101  # down to the 1 % floor
    assert 115 <= jumpy.estimate("m", prompt) <= 120  # a margin for the swings (capped at 20 %)
    assert steady.estimate("other", prompt) == 105  # per model: nothing learnt about this one


async def test_after_a_denial_a_claim_leaves_the_models_other_jobs_untouched() -> None:
    # one request a minute, eight jobs claimed per batch: were every candidate booked, each
    # freed slot would be met by one admission and seven denials
    clock = FakeClock()
    store = MemoryStore()
    pipeline = Pipeline("probe", (ModelStage("ask", ("m",), lambda c: Prompt(str(c.payload))),))
    run = store.create_run(
        pipeline=pipeline.name,
        name="r",
        stages=pipeline.specs,
        items=[NewItem(str(i), text(i)) for i in range(12)],
        meta={},
        now=clock.now(),
    )
    dispatcher = Dispatcher(
        store,
        pipeline,
        ScriptedAdapter(),
        limits={"m": ModelLimits(rpm=1, window_margin_s=0.0)},
        clock=clock,
        settings=DispatcherSettings(concurrency=8),
    )
    stats = await dispatcher.run_until_idle()
    assert store.get_run(run.id).status is RunStatus.COMPLETED
    gaps = [b - a for a, b in zip(starts(store, run.id), starts(store, run.id)[1:], strict=False)]
    assert all(gap >= 60 for gap in gaps)
    # each claim admits what fits, is denied once (the head of the rest) and stops there
    assert stats.deferred <= 11


async def test_a_call_that_left_late_holds_its_slot_from_when_it_left() -> None:
    # the adapter saw each request leave 2.5 s after it was asked for (a busy event loop):
    # the provider counts it from then, so the next call must wait 60 s from the send
    late = ModelResponse("ok", Usage(input_tokens=100), "m", send_delay_s=2.5)
    adapter = ScriptedAdapter({"m": [late] * 3})
    store, dispatcher, run_id, _clock = setup(3, adapter, None, DispatcherSettings(), rpm=1)
    await dispatcher.run_until_idle()
    assert store.get_run(run_id).status is RunStatus.COMPLETED
    begun = starts(store, run_id)
    assert [b - a for a, b in itertools.pairwise(begun)] == [62.5, 62.5]


@pytest.mark.parametrize("chain", [("small", "big"), ("small",)])
async def test_a_prompt_larger_than_a_whole_minute_falls_back_or_fails_and_the_rest_runs(
    chain: tuple[str, ...],
) -> None:
    # "small" admits 100 tokens a minute; one prompt needs ~1,000: it must not hold up the
    # queue (the claim that planned it once rolled back every time, and nothing ran at all)
    clock = FakeClock()
    store = MemoryStore()
    pipeline = Pipeline("big", (ModelStage("ask", chain, lambda c: Prompt(str(c.payload))),))
    payloads = ["x" * 4000] + [f"{i}" * 40 for i in range(5)]
    run = store.create_run(
        pipeline=pipeline.name,
        name="r",
        stages=pipeline.specs,
        items=[NewItem(str(i), p) for i, p in enumerate(payloads)],
        meta={},
        now=clock.now(),
    )
    limits = {"small": ModelLimits(tpm=100, window_margin_s=0.0), "big": ModelLimits()}
    dispatcher = Dispatcher(store, pipeline, ScriptedAdapter(), limits=limits, clock=clock)
    with anyio.fail_after(30):
        await dispatcher.run_until_idle()
    items = {i.key: i for i in store.items(run.id)}
    assert all(items[str(i)].status is ItemStatus.COMPLETED for i in range(1, 6))
    models = {a.item_key: a.result.model for a in store.attempts(run.id) if a.result.model}
    if len(chain) == 2:
        assert items["0"].status is ItemStatus.COMPLETED and models["0"] == "big"
    else:
        assert items["0"].status is ItemStatus.NEEDS_REUPLOAD
        assert "split the input" in (items["0"].error or "")


async def test_a_reply_without_usage_keeps_its_reservation() -> None:
    # 250 tokens a minute, ~105 reserved per call: two a minute. A reply that reports no input
    # tokens (usage_metadata missing) must not refund the booking, or all four would go at once
    blind = ModelResponse("ok", Usage(), "m")
    adapter = ScriptedAdapter({"m": [blind] * 4})
    store, dispatcher, run_id, _clock = setup(4, adapter, 250, DispatcherSettings())
    await dispatcher.run_until_idle()
    assert store.get_run(run_id).status is RunStatus.COMPLETED
    begun = starts(store, run_id)
    assert begun[2] - begun[0] >= 60 and begun[3] - begun[1] >= 60
