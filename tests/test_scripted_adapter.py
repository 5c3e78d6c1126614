"""ScriptedAdapter: the in-memory ModelAdapter that tests of the queue drive."""

from __future__ import annotations

import subprocess
import sys

import pydantic
import pytest

from llm_batch_queue.adapters.base import ModelAdapter, ModelRequest, ModelResponse, Usage
from llm_batch_queue.adapters.scripted import ScriptedAdapter
from llm_batch_queue.clock import FakeClock
from llm_batch_queue.errors import InvalidOutput, QuotaScope, RateLimited, TransientError

pytestmark = pytest.mark.anyio


class Verdict(pydantic.BaseModel):
    ok: bool
    reason: str


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_outcomes_play_back_in_order_per_model() -> None:
    limited = RateLimited("429", scope=QuotaScope.DAY, retry_after_s=None)
    canned = ModelResponse(text="canned", usage=Usage(1, 2, 3), model="b")
    adapter = ScriptedAdapter({"a": [limited, "first"], "b": [canned]})
    adapter.script("a", TransientError("503", status_code=503))

    with pytest.raises(RateLimited) as caught:
        await adapter.generate(ModelRequest(model="a", prompt="p1"))
    assert caught.value is limited
    assert (await adapter.generate(ModelRequest(model="a", prompt="p2"))).text == "first"
    assert await adapter.generate(ModelRequest(model="b", prompt="p3")) is canned
    with pytest.raises(TransientError):
        await adapter.generate(ModelRequest(model="a", prompt="p4"))
    assert adapter.remaining("a") == adapter.remaining("b") == 0
    assert [r.prompt for r in adapter.calls] == ["p1", "p2", "p3", "p4"]
    assert [r.prompt for r in adapter.calls_to("a")] == ["p1", "p2", "p4"]


async def test_text_outcomes_get_usage_by_the_simulators_rule() -> None:
    adapter = ScriptedAdapter({"m": ["x" * 9]})
    request = ModelRequest(model="m", prompt="y" * 5, system="z" * 6)
    response = await adapter.generate(request)
    assert response.usage == Usage(input_tokens=3, output_tokens=3)
    assert response.finish_reason == "STOP"
    assert await adapter.count_tokens(request) == 3


async def test_json_replies_are_parsed_and_checked() -> None:
    schema = Verdict.model_json_schema()
    adapter = ScriptedAdapter({"m": ['{"ok": true, "reason": "fine"}', "not json", ""]})
    request = ModelRequest(model="m", prompt="judge", output_schema=schema)
    assert (await adapter.generate(request)).parsed == {"ok": True, "reason": "fine"}
    with pytest.raises(InvalidOutput):
        await adapter.generate(request)
    with pytest.raises(InvalidOutput):
        await adapter.generate(request)


async def test_default_responder_answers_once_the_script_is_empty() -> None:
    adapter = ScriptedAdapter()
    structured = ModelRequest(model="m", prompt="?", output_schema=Verdict.model_json_schema())
    Verdict.model_validate((await adapter.generate(structured)).parsed)
    assert (await adapter.generate(ModelRequest(model="m", prompt="hi"))).text == "echo: hi"

    custom = ScriptedAdapter(default=lambda request: TransientError("always down"))
    with pytest.raises(TransientError):
        await custom.generate(ModelRequest(model="m", prompt="hi"))


async def test_latency_goes_through_the_injected_sleep() -> None:
    clock = FakeClock()
    start = clock.now()
    adapter = ScriptedAdapter(latency_s=2.5, sleep=clock.sleep)
    await adapter.generate(ModelRequest(model="m", prompt="hi"))
    assert clock.now() - start == 2.5


async def test_is_a_model_adapter_and_closes() -> None:
    adapter = ScriptedAdapter()
    assert isinstance(adapter, ModelAdapter)
    await adapter.aclose()
    assert adapter.closed


def test_scripted_adapter_and_simulator_do_not_load_google_genai() -> None:
    code = (
        "import sys, llm_batch_queue.adapters.scripted, llm_batch_queue.simulator;"
        "sys.exit('google.genai' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
