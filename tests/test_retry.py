"""The retry/fallback decision, table-tested: every error kind, at every place in a chain."""

from __future__ import annotations

import random

import pytest

from llm_batch_queue.errors import (
    CallError,
    InvalidOutput,
    ModelNotFound,
    PermanentError,
    QuotaScope,
    RateLimited,
    TransientError,
)
from llm_batch_queue.jobs import GiveUp, Job, JobStatus, Retry
from llm_batch_queue.limits import next_day_start
from llm_batch_queue.retry import RetryPolicy, decide

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z = 2025-12-31 16:00 Pacific
CHAIN = ("pro", "flash")
POLICY = RetryPolicy(base_delay_s=2.0, jitter=0.0, switch_after=2)
TZ = "America/Los_Angeles"


def job(
    model_index: int = 0, attempts: int = 0, model_failures: int = 0, max_attempts: int = 5
) -> Job:
    return Job(
        "j",
        "r",
        "i",
        "analyze",
        JobStatus.RUNNING,
        0,
        attempts,
        max_attempts,
        NOW,
        model_index,
        None,
        model_failures,
    )


def run(error: CallError, j: Job | None = None, streak: int = 0) -> tuple[object, object]:
    d = decide(
        POLICY,
        CHAIN,
        j or job(),
        error,
        NOW,
        day_tz=TZ,
        rate_limit_streak=streak,
        rng=random.Random(1),
    )
    return d.outcome, d.block


DAY_RESET = next_day_start(NOW, TZ)


@pytest.mark.parametrize(
    ("error", "j", "streak", "expected", "block"),
    [
        # per-minute 429 with RetryInfo: wait exactly that long on the same model, no attempt used
        (
            RateLimited("429", scope=QuotaScope.MINUTE, retry_after_s=53.0),
            job(),
            0,
            Retry(NOW + 53, 0, "pro: rate limited", False),
            ("pro", NOW + 53, "cooldown"),
        ),
        # 429 without details: exponential on the streak of 429s
        (
            RateLimited("429"),
            job(),
            0,
            Retry(NOW + 5, 0, "pro: rate limited", False),
            ("pro", NOW + 5, "cooldown"),
        ),
        (
            RateLimited("429"),
            job(),
            3,
            Retry(NOW + 40, 0, "pro: rate limited", False),
            ("pro", NOW + 40, "cooldown"),
        ),
        # per-day quota: park the model until Pacific midnight and fall back at once
        (
            RateLimited("429", scope=QuotaScope.DAY),
            job(),
            0,
            Retry(NOW, 1, "pro: daily quota spent", False),
            ("pro", DAY_RESET, "day"),
        ),
        # ... and on the last model of the chain, wait for the reset
        (
            RateLimited("429", scope=QuotaScope.DAY),
            job(model_index=1),
            0,
            Retry(DAY_RESET, 1, "flash: daily quota spent", False),
            ("flash", DAY_RESET, "day"),
        ),
        # 404: skip to the next model now; nothing left: give up
        (
            ModelNotFound("gone", status_code=404),
            job(),
            0,
            Retry(NOW, 1, "pro: model not found", False),
            ("pro", NOW + 3600, "not_found"),
        ),
        (
            ModelNotFound("gone", status_code=404),
            job(model_index=1),
            0,
            GiveUp("no usable model: gone"),
            ("flash", NOW + 3600, "not_found"),
        ),
        # 400/403: the same request fails the same way
        (
            PermanentError("bad key", status_code=403),
            job(),
            0,
            GiveUp("permanent error: bad key"),
            None,
        ),
        # transient: backoff on the same model, then move on after switch_after failures
        (
            TransientError("503", status_code=503),
            job(),
            0,
            Retry(NOW + 2, 0, "transient: 503"),
            None,
        ),
        (
            TransientError("503"),
            job(attempts=1, model_failures=1),
            0,
            Retry(NOW + 4, 1, "transient: 503"),
            None,
        ),
        (
            InvalidOutput("not json"),
            job(model_index=1, attempts=2, model_failures=5),
            0,
            Retry(NOW + 8, 1, "invalid_output: not json"),
            None,
        ),
        # the last allowed attempt failed: give up with the reason
        (
            TransientError("timeout"),
            job(attempts=4),
            0,
            GiveUp("gave up after 5 attempts: timeout"),
            None,
        ),
    ],
)
def test_decision_table(
    error: CallError, j: Job, streak: int, expected: object, block: tuple[str, float, str] | None
) -> None:
    outcome, got_block = run(error, j, streak)
    assert outcome == expected
    if block is None:
        assert got_block is None
    else:
        assert got_block is not None
        assert (got_block.model, got_block.until, got_block.reason) == block  # type: ignore[attr-defined]


def test_rate_limits_never_use_up_attempts() -> None:
    outcome, _ = run(RateLimited("429", retry_after_s=1.0), job(attempts=4))
    assert isinstance(outcome, Retry) and outcome.counted is False


def test_backoff_has_jitter_and_a_cap() -> None:
    policy = RetryPolicy(base_delay_s=2.0, max_delay_s=60.0, jitter=0.5)
    rng = random.Random(7)
    delays = [policy.backoff(10, rng) for _ in range(50)]
    assert all(30.0 <= d <= 60.0 for d in delays)
    assert len(set(delays)) > 40


def test_day_reset_follows_pacific_daylight_saving() -> None:
    # 2026-03-08 is the spring-forward day in Los Angeles: that day is 23 hours long
    before = 1_772_956_800.0 + 12 * 3600  # 2026-03-08T12:00Z
    reset = next_day_start(before, TZ)
    assert reset == 1_773_039_600.0  # 2026-03-09T07:00Z (midnight PDT, UTC-7)
    assert next_day_start(NOW, TZ) == 1_767_254_400.0  # 2026-01-01T08:00Z (midnight PST)
