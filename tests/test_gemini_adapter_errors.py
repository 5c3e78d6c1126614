"""Classifying Google API error bodies, on plain dicts (no SDK, no HTTP)."""

from __future__ import annotations

from typing import Any

import pytest

from llm_batch_queue.adapters._google_rpc import error_from_status, parse_quota_error
from llm_batch_queue.errors import (
    ModelNotFound,
    PermanentError,
    QuotaScope,
    RateLimited,
    TransientError,
)

HELP = {"@type": "type.googleapis.com/google.rpc.Help", "links": [{"url": "https://ai.dev"}]}


def quota_failure(*quota_ids: str) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [{"quotaId": q, "quotaDimensions": {"model": "m"}} for q in quota_ids],
    }


def retry_info(delay: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}


def body(*details: dict[str, Any], message: str = "quota") -> dict[str, Any]:
    return {
        "error": {
            "code": 429,
            "status": "RESOURCE_EXHAUSTED",
            "message": message,
            "details": list(details),
        }
    }


@pytest.mark.parametrize(
    ("error_body", "scope", "retry_after_s", "quota_id"),
    [
        (
            body(
                quota_failure("GenerateRequestsPerMinutePerProjectPerModel-FreeTier"),
                HELP,
                retry_info("53s"),
            ),
            QuotaScope.MINUTE,
            53.0,
            "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
        ),
        (
            body(quota_failure("GenerateContentInputTokensPerModelPerMinute"), retry_info("45.8s")),
            QuotaScope.MINUTE,
            45.8,
            "GenerateContentInputTokensPerModelPerMinute",
        ),
        (
            body(
                quota_failure(
                    "GenerateRequestsPerMinutePerProjectPerModel",
                    "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                ),
                retry_info("3600s"),
            ),
            QuotaScope.DAY,
            3600.0,
            "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
        ),
        (body(HELP), QuotaScope.UNKNOWN, None, None),
        (body(HELP, message="Please retry in 12.25s."), QuotaScope.UNKNOWN, 12.25, None),
        (
            body(quota_failure("SomethingElse"), retry_info("bogus")),
            QuotaScope.UNKNOWN,
            None,
            "SomethingElse",
        ),
        ({"error": {"code": 429}}, QuotaScope.UNKNOWN, None, None),
        ("<html>Too Many Requests</html>", QuotaScope.UNKNOWN, None, None),
    ],
)
def test_parse_quota_error(
    error_body: Any, scope: QuotaScope, retry_after_s: float | None, quota_id: str | None
) -> None:
    message = error_body["error"].get("message") if isinstance(error_body, dict) else None
    info = parse_quota_error(error_body, message)
    assert (info.scope, info.retry_after_s, info.quota_id) == (scope, retry_after_s, quota_id)


def test_retry_info_wins_over_the_message() -> None:
    info = parse_quota_error(body(retry_info("7s")), "Please retry in 53.016342224s.")
    assert info.retry_after_s == 7.0


def test_429_becomes_rate_limited_with_its_quota() -> None:
    error_body = body(quota_failure("GenerateRequestsPerDayPerProjectPerModel"), retry_info("9s"))
    error = error_from_status(429, "quota", error_body)
    assert isinstance(error, RateLimited)
    assert (error.scope, error.retry_after_s, error.status_code) == (QuotaScope.DAY, 9.0, 429)
    assert error.quota_id == "GenerateRequestsPerDayPerProjectPerModel"


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (404, ModelNotFound),
        (400, PermanentError),
        (401, PermanentError),
        (403, PermanentError),
        (413, PermanentError),
        (408, TransientError),
        (499, TransientError),
        (500, TransientError),
        (502, TransientError),
        (503, TransientError),
        (504, TransientError),
    ],
)
def test_status_codes_map_to_error_kinds(code: int, kind: type[Exception]) -> None:
    error = error_from_status(code, "boom", {"error": {"code": code, "message": "boom"}})
    assert type(error) is kind
    assert error.status_code == code
    assert "boom" in error.message
