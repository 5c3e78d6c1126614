"""The simulator's quotas and load statistics, driven without HTTP through GeminiService."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from llm_batch_queue.clock import FakeClock
from llm_batch_queue.simulator import ModelConfig, QuotaKind
from llm_batch_queue.simulator.quota import PACIFIC, QuotaLedger, seconds_until_reset
from llm_batch_queue.simulator.service import GeminiService, Reply

MODEL = "gemini-2.5-flash"
T0 = datetime(2026, 1, 14, 10, 0, tzinfo=PACIFIC).timestamp()  # on a clock-minute boundary


def body(prompt: str = "ping") -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}


def call(service: GeminiService, prompt: str = "ping") -> Reply:
    return service.handle(
        api_version="v1beta", model=MODEL, method="generateContent", body=body(prompt), api_key="k"
    )


def test_rpm_window_slides_instead_of_resetting_on_the_clock_minute() -> None:
    ledger, config = QuotaLedger(), ModelConfig(rpm=2)
    ledger.admit(T0 + 59, 1)
    ledger.admit(T0 + 60, 1)  # a new clock minute, but the same sliding window
    violation = ledger.check(config, T0 + 90, 1)
    assert violation is not None
    assert violation.kind is QuotaKind.REQUESTS_PER_MINUTE
    assert violation.retry_after_s == pytest.approx(29.0)
    assert ledger.check(config, T0 + 119, 1) is None  # the T0+59 request has left the window


def test_token_window_waits_until_enough_old_tokens_leave() -> None:
    ledger, config = QuotaLedger(), ModelConfig(tpm=100)
    ledger.admit(T0, 60)
    ledger.admit(T0 + 10, 30)
    violation = ledger.check(config, T0 + 20, 20)
    assert violation is not None
    assert violation.kind is QuotaKind.INPUT_TOKENS_PER_MINUTE
    assert violation.retry_after_s == pytest.approx(40.0)  # the 60-token entry leaves at T0+60
    assert ledger.check(config, T0 + 20, 10) is None


def test_request_larger_than_the_token_budget_is_always_refused() -> None:
    violation = QuotaLedger().check(ModelConfig(tpm=10), T0, 11)
    assert violation is not None
    assert violation.retry_after_s == 60.0


def test_day_quota_resets_at_pacific_midnight() -> None:
    ledger, config = QuotaLedger(), ModelConfig(rpd=1)
    before_midnight = datetime(2026, 1, 14, 23, 59, tzinfo=PACIFIC).timestamp()
    ledger.admit(before_midnight, 1)
    violation = ledger.check(config, before_midnight + 30, 1)
    assert violation is not None
    assert violation.kind is QuotaKind.REQUESTS_PER_DAY
    assert violation.retry_after_s == pytest.approx(30.0)
    assert ledger.check(config, before_midnight + 60, 1) is None


def test_provider_day_is_23_hours_long_when_dst_starts() -> None:
    dst_start_day = datetime(2026, 3, 8, 0, 0, tzinfo=PACIFIC).timestamp()
    assert seconds_until_reset(dst_start_day) == 23 * 3600


def test_rejected_requests_do_not_count_against_the_window() -> None:
    clock = FakeClock(T0)
    service = GeminiService({MODEL: ModelConfig(rpm=1)}, clock=clock.now)
    assert call(service).status == 200
    clock.advance(30)
    assert call(service).status == 429
    clock.advance(30)
    assert call(service).status == 200  # the refused call at +30 s would otherwise still count
    stats = service.stats()[MODEL]
    assert stats.requests_by_status == {200: 2, 429: 1}
    assert stats.rate_limited == {QuotaKind.REQUESTS_PER_MINUTE.value: 1}
    assert stats.admitted == 2


def test_stats_report_exact_sliding_window_maxima() -> None:
    clock = FakeClock(T0)
    service = GeminiService({MODEL: ModelConfig()}, clock=clock.now)
    # (seconds after T0, prompt characters); 4 characters make one token.
    for at, chars in [(0, 40), (10, 8), (59.9, 4), (60, 400), (119.95, 4), (200, 4)]:
        clock.advance(T0 + at - clock.now())
        assert call(service, "x" * chars).status == 200
    stats = service.stats()[MODEL]
    assert stats.admitted == 6
    assert stats.input_tokens == 10 + 2 + 1 + 100 + 1 + 1
    # (0, 60] holds 10, 59.9 and 60: three requests; no window holds four.
    assert stats.max_requests_per_window == 3
    # The heaviest is (0, 60] too: 2 + 1 + 100 tokens; (59.95, 119.95] has only 101.
    assert stats.max_input_tokens_per_window == 103
    assert stats.max_requests_per_day == 6


def test_stats_count_requests_per_provider_day() -> None:
    clock = FakeClock(datetime(2026, 1, 14, 23, 58, tzinfo=PACIFIC).timestamp())
    service = GeminiService({MODEL: ModelConfig()}, clock=clock.now)
    for _ in range(3):
        call(service)
        clock.advance(61)  # the third call lands after Pacific midnight
    assert service.stats()[MODEL].max_requests_per_day == 2


def test_reset_forgets_admissions_and_counters() -> None:
    clock = FakeClock(T0)
    service = GeminiService({MODEL: ModelConfig(rpm=1)}, clock=clock.now)
    call(service)
    assert call(service).status == 429
    service.reset()
    assert call(service).status == 200
    assert service.stats()[MODEL].requests_by_status == {200: 1}
