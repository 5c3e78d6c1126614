"""What the simulated model says: the request a responder sees, and the default responder."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from llm_batch_queue.simulator.schema import minimal_instance


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One generateContent call as a responder sees it."""

    model: str
    prompt: str  # text parts of all `contents`, joined by newlines
    system: str | None  # text of `systemInstruction`
    json_schema: dict[str, Any] | None  # `responseJsonSchema`, else `responseSchema`
    wants_json: bool  # responseMimeType was application/json
    body: dict[str, Any]  # the raw request body (camelCase)


class Responder(Protocol):
    def __call__(self, request: SimRequest, /) -> str:
        """Return the reply text; faults (truncation, bad JSON) are applied afterwards."""
        ...


def lorem_responder(request: SimRequest) -> str:
    """The schema's minimal valid instance when one was sent, else a short echo of the prompt."""
    if request.json_schema is not None:
        return json.dumps(minimal_instance(request.json_schema))
    if request.wants_json:
        return "{}"
    return f"Lorem ipsum. You said: {request.prompt[:200]}"


def parse_request(model: str, body: dict[str, Any]) -> SimRequest:
    config = body.get("generationConfig") or {}
    schema = config.get("responseJsonSchema") or config.get("responseSchema")
    system = body.get("systemInstruction")
    return SimRequest(
        model=model,
        prompt="\n".join(_texts(body.get("contents") or [])),
        system="\n".join(_texts([system])) if system else None,
        json_schema=schema if isinstance(schema, dict) else None,
        wants_json=config.get("responseMimeType") == "application/json",
        body=body,
    )


def token_count(text_chars: int) -> int:
    """The simulator's tokenizer: one token per started 4 characters."""
    return math.ceil(text_chars / 4)


def input_tokens(body: dict[str, Any]) -> int:
    """Tokens of every text part in `contents` and `systemInstruction`.

    Part boundaries do not matter, so counting [system, prompt] as two contents (what a client
    must do for countTokens) gives the same number generateContent charges.
    """
    body = body.get("generateContentRequest", body)  # countTokens' alternative body shape
    contents = list(body.get("contents") or [])
    if body.get("systemInstruction"):
        contents.append(body["systemInstruction"])
    return token_count(sum(len(text) for text in _texts(contents)))


def _texts(contents: Iterable[Any]) -> list[str]:
    texts: list[str] = []
    for content in contents:
        parts = (content.get("parts") or []) if isinstance(content, dict) else []
        texts += [
            p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)
        ]
    return texts
