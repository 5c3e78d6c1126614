"""The ModelAdapter seam: one call to one model, classified errors, real usage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from llm_batch_queue._frozen import fast_init

JSONSchema = dict[str, Any]


@fast_init
@dataclass(frozen=True, slots=True)
class ModelRequest:
    """What a stage asks of a model. `output_schema` is a JSON Schema for structured output."""

    model: str
    prompt: str
    system: str | None = None
    output_schema: JSONSchema | None = None
    temperature: float | None = 0.0
    max_output_tokens: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@fast_init
@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens as the provider counted them (input is what TPM limits count)."""

    input_tokens: int = 0
    output_tokens: int = 0
    thinking_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens + self.thinking_tokens


@fast_init
@dataclass(frozen=True, slots=True)
class ModelResponse:
    text: str
    usage: Usage
    model: str
    status_code: int = 200
    finish_reason: str | None = None
    parsed: Any = None
    # seconds from generate() being called to the request leaving for the provider, if the
    # adapter can tell: the dispatcher moves the call's rate-ledger booking to then, because
    # the provider's minute counts a request from its arrival (None: the booking stands)
    send_delay_s: float | None = None


@runtime_checkable
class ModelAdapter(Protocol):
    """Makes exactly one provider request per `generate` call; never retries on its own.

    Failures must be raised as `llm_batch_queue.errors.CallError` subclasses.
    """

    async def generate(self, request: ModelRequest) -> ModelResponse: ...

    async def count_tokens(self, request: ModelRequest) -> int | None:
        """Input tokens of `request` as the provider counts them, or None if not cheap/available."""
        ...

    async def aclose(self) -> None: ...
