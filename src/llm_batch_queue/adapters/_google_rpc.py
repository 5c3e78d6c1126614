"""Google API error bodies → the queue's error tree. Pure functions over decoded JSON.

The SDK never reads RetryInfo or QuotaFailure, so the adapter does it here (google-genai.md §5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from llm_batch_queue.errors import (
    CallError,
    ModelNotFound,
    PermanentError,
    QuotaScope,
    RateLimited,
    TransientError,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
_RETRY_IN_MESSAGE = re.compile(r"retry in (\d+(?:\.\d+)?)s", re.IGNORECASE)
_TRANSIENT_CODES = frozenset({408, 499})


@dataclass(frozen=True, slots=True)
class QuotaInfo:
    scope: QuotaScope
    retry_after_s: float | None
    quota_id: str | None


def parse_quota_error(body: Any, message: str | None = None) -> QuotaInfo:
    """Read a 429 body (`{"error": {...}}` or the inner object) and its message.

    With several violations a per-day one wins: it outlasts any per-minute wait.
    """
    details = _details(body)
    quota_ids = [
        str(violation["quotaId"])
        for detail in details
        if _is(detail, "google.rpc.QuotaFailure")
        for violation in detail.get("violations") or []
        if isinstance(violation, dict) and violation.get("quotaId")
    ]
    quota_id = next((q for q in quota_ids if "PerDay" in q), None)
    quota_id = quota_id or next((q for q in quota_ids if "PerMinute" in q), None)
    quota_id = quota_id or next(iter(quota_ids), None)
    return QuotaInfo(
        scope=_scope(quota_id),
        retry_after_s=_retry_delay(details, message),
        quota_id=quota_id,
    )


def error_from_status(code: int, message: str | None, body: Any) -> CallError:
    """Classify a non-200 reply. `body` is the decoded JSON (the SDK's `APIError.details`)."""
    text = f"{code}: {message or 'no message'}"
    if code == 429:
        info = parse_quota_error(body, message)
        return RateLimited(
            text,
            scope=info.scope,
            retry_after_s=info.retry_after_s,
            quota_id=info.quota_id,
            status_code=code,
        )
    if code == 404:
        return ModelNotFound(text, status_code=code)
    if code in _TRANSIENT_CODES or code >= 500:
        return TransientError(text, status_code=code)
    if 400 <= code < 500:
        return PermanentError(text, status_code=code)
    return TransientError(text, status_code=code)  # an odd 1xx-3xx from a proxy


def _details(body: Any) -> list[dict[str, Any]]:
    inner = body.get("error", body) if isinstance(body, dict) else None
    details = inner.get("details") if isinstance(inner, dict) else None
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _is(detail: dict[str, Any], type_name: str) -> bool:
    return str(detail.get("@type", "")).endswith(type_name)


def _scope(quota_id: str | None) -> QuotaScope:
    if quota_id and "PerDay" in quota_id:
        return QuotaScope.DAY
    if quota_id and "PerMinute" in quota_id:
        return QuotaScope.MINUTE
    return QuotaScope.UNKNOWN


def _retry_delay(details: list[dict[str, Any]], message: str | None) -> float | None:
    for detail in details:
        if _is(detail, "google.rpc.RetryInfo"):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    match = _RETRY_IN_MESSAGE.search(message or "")
    return float(match.group(1)) if match else None
