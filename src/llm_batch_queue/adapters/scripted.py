"""ScriptedAdapter: an in-memory ModelAdapter that plays back per-model scripts of outcomes."""

from __future__ import annotations

import json
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping

import anyio

from llm_batch_queue.adapters._output import checked_output
from llm_batch_queue.adapters.base import ModelRequest, ModelResponse, Usage
from llm_batch_queue.errors import CallError
from llm_batch_queue.simulator.responder import token_count
from llm_batch_queue.simulator.schema import minimal_instance

Outcome = str | ModelResponse | CallError
"""A reply text, a complete response (returned as is), or a classified error to raise."""


def echo_reply(request: ModelRequest) -> str:
    """The schema's minimal valid instance when one is asked for, else the prompt echoed back."""
    if request.output_schema is not None:
        return json.dumps(minimal_instance(request.output_schema))
    return f"echo: {request.prompt}"


class ScriptedAdapter:
    """Each `generate` call pops the next outcome scripted for its model, else asks `default`.

    Text outcomes go through the same checks as the Gemini adapter (empty → InvalidOutput,
    unparseable JSON when a schema was asked for → InvalidOutput) and get usage by the
    simulator's rule, ceil(chars / 4).
    """

    def __init__(
        self,
        scripts: Mapping[str, Iterable[Outcome]] | None = None,
        *,
        default: Callable[[ModelRequest], Outcome] = echo_reply,
        latency_s: float = 0.0,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,  # e.g. a FakeClock's sleep
    ) -> None:
        self._scripts: defaultdict[str, deque[Outcome]] = defaultdict(deque)
        for model, outcomes in (scripts or {}).items():
            self.script(model, *outcomes)
        self._default = default
        self._latency_s = latency_s
        self._sleep = sleep
        self.calls: list[ModelRequest] = []  # every generate call, in arrival order
        self.closed = False

    def script(self, model: str, *outcomes: Outcome) -> None:
        """Queue outcomes for `model`'s next calls, after any already queued."""
        self._scripts[model].extend(outcomes)

    def remaining(self, model: str) -> int:
        return len(self._scripts[model])

    def calls_to(self, model: str) -> list[ModelRequest]:
        return [call for call in self.calls if call.model == model]

    async def generate(self, request: ModelRequest) -> ModelResponse:
        self.calls.append(request)
        script = self._scripts[request.model]
        outcome = script.popleft() if script else self._default(request)
        if self._latency_s > 0:
            await self._sleep(self._latency_s)
        if isinstance(outcome, CallError):
            raise outcome
        if isinstance(outcome, ModelResponse):
            return outcome
        text, parsed = checked_output(
            outcome, wants_json=request.output_schema is not None, finish_reason="STOP"
        )
        return ModelResponse(
            text=text,
            usage=Usage(input_tokens=_input_tokens(request), output_tokens=token_count(len(text))),
            model=request.model,
            finish_reason="STOP",
            parsed=parsed,
        )

    async def count_tokens(self, request: ModelRequest) -> int:
        return _input_tokens(request)

    async def aclose(self) -> None:
        self.closed = True


def _input_tokens(request: ModelRequest) -> int:
    return token_count(len(request.prompt) + len(request.system or ""))
