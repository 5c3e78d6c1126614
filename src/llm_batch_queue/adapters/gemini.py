"""GeminiAdapter: the ModelAdapter over the google-genai SDK (the only module importing it).

Settings follow google-genai.md §8: api_version pinned, a timeout always set (the SDK otherwise
sends none), SDK retries off (the queue owns backoff), automatic continuation off (one job = one
HTTP request = one rate-limit reservation).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextvars import ContextVar
from enum import Enum

import httpx2
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from llm_batch_queue.adapters._google_rpc import error_from_status
from llm_batch_queue.adapters._output import checked_output
from llm_batch_queue.adapters.base import ModelRequest, ModelResponse, Usage
from llm_batch_queue.errors import CallError, ConfigError, InvalidOutput, TransientError


class GeminiAdapter:
    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,  # None: the public endpoint
        api_version: str = "v1beta",
        timeout_ms: int = 120_000,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if timeout_ms <= 0:
            raise ConfigError(
                f"timeout_ms must be positive (the SDK waits forever otherwise), got {timeout_ms}"
            )
        self._endpoint = base_url or "the Gemini API"
        # our own httpx2 client, for its request hook (the moment a call leaves); passing one
        # also keeps the SDK off aiohttp and its hidden connection retry (google-genai.md §0)
        self._http = httpx2.AsyncClient(event_hooks={"request": [_note_sent]})
        self._client = genai.Client(
            api_key=api_key,
            http_options=types.HttpOptions(
                base_url=base_url,
                api_version=api_version,
                timeout=timeout_ms,
                retry_options=types.HttpRetryOptions(attempts=1),
                headers=dict(headers) if headers else None,
                httpx_async_client=self._http,
            ),
        )

    async def generate(self, request: ModelRequest) -> ModelResponse:
        wants_json = request.output_schema is not None
        config = types.GenerateContentConfig(
            system_instruction=request.system,
            temperature=request.temperature,
            max_output_tokens=request.max_output_tokens,
            response_mime_type="application/json" if wants_json else None,
            response_json_schema=request.output_schema,
            automatic_continuation=False,
        )
        sent: list[float] = []
        watch = _sent.set(sent)
        called = time.monotonic()
        try:
            response = await self._client.aio.models.generate_content(
                model=request.model, contents=request.prompt, config=config
            )
        except (genai_errors.APIError, httpx2.TransportError, TimeoutError) as exc:
            error = _classified(exc, self._endpoint)
            error.send_delay_s = sent[0] - called if sent else None
            raise error from exc
        finally:
            _sent.reset(watch)
        send_delay_s = sent[0] - called if sent else None

        try:
            feedback = response.prompt_feedback
            if feedback is not None and feedback.block_reason is not None:
                reason = _name(feedback.block_reason)
                raise InvalidOutput(f"prompt blocked: {reason}", status_code=200)
            candidate = response.candidates[0] if response.candidates else None
            finish_reason = _name(candidate.finish_reason) if candidate else None
            text, parsed = checked_output(
                response.text, wants_json=wants_json, finish_reason=finish_reason
            )
        except CallError as error:
            error.send_delay_s = send_delay_s
            raise
        usage = response.usage_metadata
        return ModelResponse(
            text=text,
            usage=Usage(
                input_tokens=(usage and usage.prompt_token_count) or 0,
                output_tokens=(usage and usage.candidates_token_count) or 0,
                thinking_tokens=(usage and usage.thoughts_token_count) or 0,
            ),
            model=request.model,
            finish_reason=finish_reason,
            parsed=parsed,
            send_delay_s=send_delay_s,
        )

    async def count_tokens(self, request: ModelRequest) -> int | None:
        """The prompt's (plus system prompt's) input tokens via the countTokens endpoint.

        The SDK refuses system_instruction here (google-genai.md §4), so the system prompt is
        counted as one more content item; the provider may charge a few tokens more for its
        role framing, which the post-call usage corrects.
        """
        contents: list[str] = (
            [request.system, request.prompt] if request.system else [request.prompt]
        )
        try:
            counted = await self._client.aio.models.count_tokens(
                model=request.model,
                contents=contents,
            )
        except (genai_errors.APIError, httpx2.TransportError, TimeoutError) as exc:
            raise _classified(exc, self._endpoint) from exc
        return counted.total_tokens

    async def aclose(self) -> None:
        await self._client.aio.aclose()
        self._client.close()
        await self._http.aclose()  # the SDK does not close a client it was given


# when the current task's generate() request left: the hooks run in the task that sends, so
# concurrent calls each fill their own list
_sent: ContextVar[list[float] | None] = ContextVar("lbq_gemini_sent", default=None)


async def _note_sent(request: httpx2.Request) -> None:
    """The request hook: runs before a connection is taken; the trace refines it to the
    moment the body was written, after any wait for the pool or a busy event loop."""
    sent = _sent.get()
    if sent is not None and not sent:
        sent.append(time.monotonic())
        request.extensions["trace"] = _trace


async def _trace(event: str, info: dict[str, object]) -> None:
    sent = _sent.get()
    if sent and event.endswith("send_request_body.complete"):
        sent[0] = time.monotonic()


def _classified(exc: Exception, endpoint: str) -> CallError:
    if isinstance(exc, genai_errors.APIError):
        return error_from_status(exc.code, exc.message, exc.details)
    # httpx2.TimeoutException is a TransportError; builtin TimeoutError is the aiohttp path's.
    # Name the endpoint: "connection refused" alone does not say which server to look at.
    return TransientError(f"{type(exc).__name__} calling {endpoint}: {exc}")


def _name(value: Enum | str | None) -> str | None:
    return value.value if isinstance(value, Enum) else value
