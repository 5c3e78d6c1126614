"""Response bodies shaped like the Gemini REST API's (camelCase, google.rpc error details)."""

from __future__ import annotations

import math
from typing import Any

from llm_batch_queue.simulator.quota import QuotaKind

RATE_LIMIT_DOCS = "https://ai.google.dev/gemini-api/docs/rate-limits"
_HELP = {
    "@type": "type.googleapis.com/google.rpc.Help",
    "links": [{"description": "Learn more about Gemini API quotas", "url": RATE_LIMIT_DOCS}],
}
_STATUS_MESSAGES = {
    500: (
        "INTERNAL",
        "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting",
    ),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
}


def error(code: int, status: str, message: str, details: list[Any] | None = None) -> dict[str, Any]:
    inner: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        inner["details"] = details
    return {"error": inner}


def server_error(code: int) -> dict[str, Any]:
    status, message = _STATUS_MESSAGES[code]
    return error(code, status, message)


def model_not_found(model: str, api_version: str, method: str) -> dict[str, Any]:
    return error(
        404,
        "NOT_FOUND",
        f"models/{model} is not found for API version {api_version}, or is not supported for "
        f"{method}. Call ListModels to see the list of available models and their supported "
        "methods.",
    )


def duration(seconds: float) -> str:
    """google.protobuf.Duration's JSON form, rounded up to the millisecond so that a client
    waiting exactly this long is admitted: "12.5s", "53s"."""
    millis = max(0, math.ceil(seconds * 1000 - 1e-6))
    whole, frac = divmod(millis, 1000)
    return f"{whole}.{frac:03d}".rstrip("0").rstrip(".") + "s"


def quota_exceeded(
    kind: QuotaKind, model: str, limit: int | None, retry_after_s: float
) -> dict[str, Any]:
    delay = duration(retry_after_s)
    violation: dict[str, Any] = {
        "quotaMetric": kind.metric,
        "quotaId": kind.quota_id,
        "quotaDimensions": {"location": "global", "model": model},
    }
    if limit is not None:
        violation["quotaValue"] = str(limit)
    message = (
        "You exceeded your current quota, please check your plan and billing details. For more "
        f"information on this error, head to: {RATE_LIMIT_DOCS}.\n"
        f"* Quota exceeded for metric: {kind.metric}, limit: {limit}, model: {model}\n"
        f"Please retry in {delay}."
    )
    details = [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [violation]},
        _HELP,
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay},
    ]
    return error(429, "RESOURCE_EXHAUSTED", message, details)


def bare_quota_exceeded() -> dict[str, Any]:
    """The older 429 shape: a Help link only, no quota id and no delay anywhere."""
    return error(
        429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota).", [_HELP]
    )


def generated(
    *,
    model: str,
    text: str | None,
    finish_reason: str,
    prompt_tokens: int,
    output_tokens: int,
    thinking_tokens: int,
    response_id: str,
) -> dict[str, Any]:
    """A generateContent reply; `text=None` sends a candidate whose content has no parts."""
    content: dict[str, Any] = {"role": "model"}
    if text is not None:
        content["parts"] = [{"text": text}]
    usage: dict[str, Any] = {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": output_tokens,
        "totalTokenCount": prompt_tokens + output_tokens + thinking_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
    }
    if thinking_tokens:
        usage["thoughtsTokenCount"] = thinking_tokens
    return {
        "candidates": [{"content": content, "finishReason": finish_reason, "index": 0}],
        "usageMetadata": usage,
        "modelVersion": model,
        "responseId": response_id,
    }
