"""GeminiAdapter driving the real google-genai SDK over HTTP against the local simulator."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import TypeVar

import anyio
import pydantic
import pytest

from llm_batch_queue.adapters.base import ModelAdapter, ModelRequest
from llm_batch_queue.adapters.gemini import GeminiAdapter
from llm_batch_queue.clock import FakeClock
from llm_batch_queue.errors import (
    CallError,
    InvalidOutput,
    ModelNotFound,
    PermanentError,
    QuotaScope,
    RateLimited,
    TransientError,
)
from llm_batch_queue.simulator import Fault, ModelConfig, SimRequest, Simulator, lorem_responder
from llm_batch_queue.simulator.quota import PACIFIC

pytestmark = pytest.mark.anyio
E = TypeVar("E", bound=CallError)

KEY = "fake-key-for-tests"
FLASH = "gemini-2.5-flash"
PRO = "gemini-2.5-pro"
T0 = datetime(2026, 1, 14, 10, 0, tzinfo=PACIFIC).timestamp()  # 14 h before the Pacific reset


class City(pydantic.BaseModel):
    name: str
    population: int


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def no_real_api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def seen() -> list[SimRequest]:
    return []


@pytest.fixture
def sim(clock: FakeClock, seen: list[SimRequest]) -> Iterator[Simulator]:
    def recording_responder(request: SimRequest) -> str:
        seen.append(request)
        return lorem_responder(request)

    models = {
        FLASH: ModelConfig(rpm=2, tpm=1000, thinking_tokens=5),
        PRO: ModelConfig(rpd=1),
    }
    with Simulator(models, clock=clock.now, api_keys={KEY}, responder=recording_responder) as sim:
        yield sim


@pytest.fixture
async def adapter(sim: Simulator) -> AsyncIterator[GeminiAdapter]:
    adapter = GeminiAdapter(api_key=KEY, base_url=sim.url, timeout_ms=5_000)
    yield adapter
    await adapter.aclose()


async def expect_error(adapter: GeminiAdapter, request: ModelRequest, kind: type[E]) -> E:
    with pytest.raises(kind) as caught:
        await adapter.generate(request)
    return caught.value


async def test_structured_call_returns_parsed_json_and_usage(
    adapter: GeminiAdapter, sim: Simulator, seen: list[SimRequest]
) -> None:
    request = ModelRequest(
        model=FLASH,
        prompt="Name a big city.",
        system="Answer as JSON.",
        output_schema=City.model_json_schema(),
        temperature=0.2,
        max_output_tokens=256,
    )
    response = await adapter.generate(request)

    assert City.model_validate(response.parsed) == City.model_validate_json(response.text)
    assert response.finish_reason == "STOP"
    assert response.model == FLASH
    assert response.usage.input_tokens == 8  # ceil((16 + 15) / 4)
    assert response.usage.output_tokens == -(-len(response.text) // 4)
    assert response.usage.thinking_tokens == 5
    stats = sim.stats()[FLASH]
    assert (stats.input_tokens, stats.output_tokens) == (8, response.usage.output_tokens)
    # What went over the wire:
    [wire] = seen
    assert (wire.prompt, wire.system, wire.wants_json) == (request.prompt, request.system, True)
    assert wire.json_schema == City.model_json_schema()
    assert wire.body["generationConfig"]["temperature"] == 0.2
    assert wire.body["generationConfig"]["maxOutputTokens"] == 256


async def test_plain_text_call(adapter: GeminiAdapter) -> None:
    response = await adapter.generate(ModelRequest(model=FLASH, prompt="hello"))
    assert "hello" in response.text
    assert response.parsed is None


async def test_count_tokens_matches_what_generate_charged(adapter: GeminiAdapter) -> None:
    # 5 + 6 characters: one token fewer than counting each part on its own.
    request = ModelRequest(model=FLASH, prompt="abcdef", system="sys!!")
    counted = await adapter.count_tokens(request)
    response = await adapter.generate(request)
    assert counted == response.usage.input_tokens == 3


async def test_rpm_window_429_carries_retry_delay_and_minute_scope(
    adapter: GeminiAdapter, clock: FakeClock
) -> None:
    request = ModelRequest(model=FLASH, prompt="hi")
    await adapter.generate(request)
    clock.advance(20)
    await adapter.generate(request)
    clock.advance(10)
    error = await expect_error(adapter, request, RateLimited)
    assert error.scope is QuotaScope.MINUTE
    assert error.retry_after_s == 30.0  # the first call leaves the window at T0 + 60
    assert error.quota_id == "GenerateRequestsPerMinutePerProjectPerModel"
    assert error.status_code == 429
    clock.advance(30)
    await adapter.generate(request)


async def test_token_window_429(adapter: GeminiAdapter) -> None:
    await adapter.generate(ModelRequest(model=FLASH, prompt="x" * 4000))  # the whole 1000 TPM
    error = await expect_error(adapter, ModelRequest(model=FLASH, prompt="x"), RateLimited)
    assert error.scope is QuotaScope.MINUTE
    assert error.quota_id == "GenerateContentInputTokensPerModelPerMinute"
    assert error.retry_after_s == 60.0


async def test_day_quota_429_parks_until_the_pacific_reset(adapter: GeminiAdapter) -> None:
    request = ModelRequest(model=PRO, prompt="hi")
    await adapter.generate(request)
    error = await expect_error(adapter, request, RateLimited)
    assert error.scope is QuotaScope.DAY
    assert error.retry_after_s == 14 * 3600.0
    assert error.quota_id == "GenerateRequestsPerDayPerProjectPerModel"


async def test_forced_day_429_on_an_unlimited_model(adapter: GeminiAdapter, sim: Simulator) -> None:
    sim.force(FLASH, Fault.RATE_LIMIT_DAY)
    error = await expect_error(adapter, ModelRequest(model=FLASH, prompt="hi"), RateLimited)
    assert error.scope is QuotaScope.DAY


async def test_429_without_retry_info_is_unknown(adapter: GeminiAdapter, sim: Simulator) -> None:
    sim.force(FLASH, Fault.RATE_LIMIT_BARE)
    error = await expect_error(adapter, ModelRequest(model=FLASH, prompt="hi"), RateLimited)
    assert (error.scope, error.retry_after_s, error.quota_id) == (QuotaScope.UNKNOWN, None, None)


@pytest.mark.parametrize(
    ("fault", "kind", "status_code"),
    [
        (Fault.UNAVAILABLE, TransientError, 503),
        (Fault.SERVER_ERROR, TransientError, 500),
        (Fault.NOT_FOUND, ModelNotFound, 404),
        (Fault.NOT_JSON, InvalidOutput, 200),
        (Fault.EMPTY, InvalidOutput, 200),
        (Fault.TRUNCATED, InvalidOutput, 200),
    ],
)
async def test_faults_are_classified(
    adapter: GeminiAdapter, sim: Simulator, fault: Fault, kind: type[CallError], status_code: int
) -> None:
    sim.force(FLASH, fault)
    request = ModelRequest(model=FLASH, prompt="hi", output_schema=City.model_json_schema())
    error = await expect_error(adapter, request, kind)
    assert type(error) is kind
    assert error.status_code == status_code


async def test_unknown_model_is_model_not_found(adapter: GeminiAdapter) -> None:
    error = await expect_error(
        adapter, ModelRequest(model="gemini-9-ultra", prompt="hi"), ModelNotFound
    )
    assert "gemini-9-ultra" in error.message


async def test_rejected_api_key_is_permanent(sim: Simulator) -> None:
    adapter = GeminiAdapter(api_key="revoked", base_url=sim.url, timeout_ms=5_000)
    try:
        error = await expect_error(adapter, ModelRequest(model=FLASH, prompt="hi"), PermanentError)
    finally:
        await adapter.aclose()
    assert error.status_code == 400


async def test_stalled_reply_times_out_as_transient(sim: Simulator) -> None:
    sim.force(FLASH, Fault.STALL)  # the server answers only after 30 s
    adapter = GeminiAdapter(api_key=KEY, base_url=sim.url, timeout_ms=300)
    try:
        with anyio.fail_after(5):
            error = await expect_error(
                adapter, ModelRequest(model=FLASH, prompt="hi"), TransientError
            )
    finally:
        await adapter.aclose()
    assert error.status_code is None
    assert "Timeout" in error.message


async def test_refused_connection_is_transient() -> None:
    with Simulator({FLASH: ModelConfig()}) as gone:
        url = gone.url
    adapter = GeminiAdapter(api_key=KEY, base_url=url, timeout_ms=2_000)
    try:
        await expect_error(adapter, ModelRequest(model=FLASH, prompt="hi"), TransientError)
        with pytest.raises(TransientError):
            await adapter.count_tokens(ModelRequest(model=FLASH, prompt="hi"))
    finally:
        await adapter.aclose()


async def test_is_a_model_adapter(adapter: GeminiAdapter) -> None:
    assert isinstance(adapter, ModelAdapter)


async def test_send_delay_is_when_the_request_left_not_when_it_was_asked_for(
    adapter: GeminiAdapter,
) -> None:
    """A busy event loop holds a call back after generate() was called; the rate ledger must
    hear when it really left (the provider's minute counts from then), for each call apart."""
    delays: dict[int, tuple[float | None, float]] = {}

    async def call(i: int) -> None:
        began = time.monotonic()
        response = await adapter.generate(ModelRequest(model=PRO if i else FLASH, prompt="hi"))
        delays[i] = (response.send_delay_s, time.monotonic() - began)

    async def hog_the_loop() -> None:
        time.sleep(0.3)  # a synchronous database call, say, on another task

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, 0)
        tg.start_soon(hog_the_loop)
    ((delay, took),) = delays.values()
    assert delay is not None and 0.3 <= delay <= took

    # on its own a call leaves at once; an error carries its send time too
    await call(1)
    assert delays[1][0] is not None and delays[1][0] < 0.1
    error = await expect_error(adapter, ModelRequest(model=PRO, prompt="hi"), RateLimited)
    assert error.send_delay_s is not None and 0 <= error.send_delay_s < 0.1
