"""The library end to end through the real google-genai SDK over HTTP to the simulator."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from llm_batch_queue import (
    Dispatcher,
    DispatcherSettings,
    ModelLimits,
    ModelStage,
    NewItem,
    Pipeline,
    Prompt,
    RetryPolicy,
    RunStatus,
    StageContext,
    TaskStage,
)
from llm_batch_queue.adapters.gemini import GeminiAdapter
from llm_batch_queue.simulator import Fault, FaultConfig, ModelConfig, SimRequest, Simulator
from llm_batch_queue.store.sql import SQLStore

pytestmark = pytest.mark.anyio


class Summary(BaseModel):
    item: int
    words: int


def reply(request: SimRequest) -> str:
    n = int(request.prompt.split()[-1])
    return Summary(item=n, words=len(request.prompt.split())).model_dump_json()


@pytest.fixture
def simulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulator]:
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    models = {
        "gemini-2.5-pro": ModelConfig(rpm=30, tpm=20_000),
        "gemini-2.5-flash": ModelConfig(rpm=60, faults=FaultConfig(unavailable_rate=0.1)),
    }
    with Simulator(models, responder=reply, seed=3) as sim:
        yield sim


async def record(ctx: StageContext) -> dict[str, int]:
    return dict(ctx.output("summarize"))


def pipeline() -> Pipeline:
    return Pipeline(
        "sdk-e2e",
        (
            ModelStage(
                "summarize",
                ("gemini-2.5-pro", "gemini-2.5-flash"),
                lambda c: Prompt(f"Summarize item {c.payload}"),
                output_type=Summary,
            ),
            TaskStage("record", record, after=("summarize",)),
        ),
    )


async def test_fallback_on_day_quota_and_404_through_the_real_sdk(
    simulator: Simulator, tmp_path: Path
) -> None:
    simulator.force("gemini-2.5-pro", Fault.RATE_LIMIT_DAY, times=100)  # its day is spent
    store = SQLStore(f"sqlite:///{tmp_path / 'queue.db'}")
    p = pipeline()
    run = store.create_run(
        pipeline=p.name,
        name="e2e",
        stages=p.specs,
        items=[NewItem(str(i), i) for i in range(12)],
        meta={},
        now=time.time(),
    )
    adapter = GeminiAdapter(api_key="test-key", base_url=simulator.url, timeout_ms=5_000)
    dispatcher = Dispatcher(
        store,
        p,
        adapter,
        limits={
            "gemini-2.5-pro": ModelLimits(rpm=30, tpm=20_000),
            "gemini-2.5-flash": ModelLimits(rpm=60),
        },
        retry=RetryPolicy(base_delay_s=0.05, max_delay_s=0.2),
        settings=DispatcherSettings(concurrency=6),
    )
    try:
        stats = await dispatcher.run_until_idle(max_wait_s=5)
    finally:
        await adapter.aclose()
    assert store.get_run(run.id).status is RunStatus.COMPLETED
    outputs = {i.key: i.outputs["record"] for i in store.items(run.id)}
    assert outputs == {str(n): {"item": n, "words": 3} for n in range(12)}
    sim = simulator.stats()
    pro = sim["gemini-2.5-pro"]
    # only the calls already in flight when the first 429 came back reached the primary
    assert pro.admitted == 0 and 1 <= pro.rate_limited["requests_per_day"] <= 6
    assert stats.provider_429 == pro.rate_limited["requests_per_day"]
    assert stats.fallbacks == 12
    flash_503 = sim["gemini-2.5-flash"].requests_by_status.get(503, 0)
    attempts = store.attempts(run.id)
    assert sum(a.result.status_code == 503 for a in attempts) == flash_503
    assert all(a.result.model is None for a in attempts if a.stage == "record")
    store.close()


async def test_a_withdrawn_model_answers_404_and_work_moves_on(
    simulator: Simulator, tmp_path: Path
) -> None:
    simulator.configure("gemini-2.5-pro", ModelConfig(not_found=True))
    store = SQLStore(f"sqlite:///{tmp_path / 'queue.db'}")
    p = pipeline()
    run = store.create_run(
        pipeline=p.name,
        name="e2e",
        stages=p.specs,
        items=[NewItem("1", 1), NewItem("2", 2)],
        meta={},
        now=time.time(),
    )
    adapter = GeminiAdapter(api_key="test-key", base_url=simulator.url, timeout_ms=5_000)
    dispatcher = Dispatcher(store, p, adapter, retry=RetryPolicy(base_delay_s=0.05))
    try:
        await dispatcher.run_until_idle(max_wait_s=5)
    finally:
        await adapter.aclose()
    assert store.get_run(run.id).status is RunStatus.COMPLETED
    not_found = [a.result for a in store.attempts(run.id) if a.result.status_code == 404]
    # calls already in flight may each see the 404; none is sent after the model is marked gone
    assert 1 <= len(not_found) <= 2
    assert all(r.error_kind == "model_not_found" and not r.counted for r in not_found)
    assert sum(simulator.stats()["gemini-2.5-pro"].requests_by_status.values()) == len(not_found)
    store.close()
