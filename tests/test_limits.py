"""The admission policy over a sliding window (pure; the stores' atomicity is tested elsewhere)."""

from __future__ import annotations

import pytest

from llm_batch_queue.errors import ConfigError, RequestTooLarge
from llm_batch_queue.limits import (
    Admit,
    Deny,
    ModelLimits,
    Quota,
    Usage,
    WindowEntry,
    admit,
    day_start,
)

NOW = 1_767_225_600.0


def usage(
    *entries: tuple[float, int], day: int = 0, in_flight: int = 0, blocked: float = 0.0
) -> Usage:
    return Usage([WindowEntry(at, tok) for at, tok in entries], day, in_flight, blocked)


def test_rpm_is_a_sliding_window_not_a_clock_minute() -> None:
    limits = ModelLimits(rpm=2, window_margin_s=0.0)
    # two requests at :59 of the previous minute: a fixed window would admit a third at :00
    full = usage((NOW - 1, 10), (NOW - 0.5, 10))
    verdict = admit(limits, full, 10, NOW)
    assert verdict == Deny(NOW - 1 + 60, "rpm")
    assert admit(limits, full, 10, NOW - 1 + 60 + 0.001) == Admit()


def test_tpm_waits_until_enough_tokens_leave_the_window() -> None:
    limits = ModelLimits(tpm=100, window_margin_s=0.0)
    state = usage((NOW - 50, 40), (NOW - 30, 40), (NOW - 10, 20))
    assert admit(limits, state, 10, NOW) == Deny(NOW - 50 + 60, "tpm")
    assert admit(limits, state, 50, NOW) == Deny(NOW - 30 + 60, "tpm")
    assert admit(limits, usage((NOW - 10, 90)), 10, NOW) == Admit()


def test_rpd_denies_until_the_provider_day_resets() -> None:
    limits = ModelLimits(rpd=3)
    verdict = admit(limits, usage(day=3), 1, NOW)
    assert isinstance(verdict, Deny) and verdict.reason == "rpd"
    assert verdict.retry_at == day_start(NOW, limits.day_tz) + 24 * 3600


def test_a_request_larger_than_the_window_fails_at_once() -> None:
    with pytest.raises(RequestTooLarge, match="1001 input tokens"):
        admit(ModelLimits(tpm=1000), usage(), 1001, NOW)


def test_cooldown_and_in_flight() -> None:
    assert admit(ModelLimits(), usage(blocked=NOW + 5), 1, NOW) == Deny(NOW + 5, "cooldown")
    assert isinstance(admit(ModelLimits(max_in_flight=2), usage(in_flight=2), 1, NOW), Deny)
    assert admit(ModelLimits(max_in_flight=2), usage(in_flight=1), 1, NOW) == Admit()


@pytest.mark.parametrize("kwargs", [{"rpm": 0}, {"tpm": -5}, {"day_tz": "Mars/Olympus"}])
def test_bad_limits_are_rejected_with_the_field_named(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ModelLimits(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [1.5, True, float("nan"), "10"])
def test_limits_must_be_whole_numbers(value: object) -> None:
    with pytest.raises(ConfigError, match="rpm must be a positive integer"):
        ModelLimits(rpm=value)  # type: ignore[arg-type]


def test_after_a_denial_smaller_requests_backfill_only_what_cannot_delay_it() -> None:
    # 60 of 100 tokens used, leaving the window at NOW - 50 (40) and NOW - 10 (20)
    limits = ModelLimits(tpm=100, window_margin_s=0.0)
    quota = Quota(limits, usage((NOW - 50, 40), (NOW - 10, 20)), NOW)
    assert quota.book(70) == Deny(NOW + 10, "tpm")  # the head: fits once the 40 have left
    # at NOW + 10 the window will hold 20 + the head's 70: 10 tokens to spare until then
    assert quota.can_backfill
    assert quota.book(30) == Deny(NOW + 10, "tpm")  # fits now, but would delay the head
    assert quota.book(8) == Admit()  # fits now and leaves the head its room
    assert quota.book(5) == Deny(NOW + 10, "tpm")  # only 2 to spare left
    assert quota.book(2) == Admit()
    assert not quota.can_backfill


def test_a_cooldown_denial_leaves_nothing_to_backfill() -> None:
    quota = Quota(ModelLimits(tpm=100), usage(blocked=NOW + 5), NOW)
    assert quota.book(10) == Deny(NOW + 5, "cooldown")
    assert not quota.can_backfill
    assert quota.book(1) == Deny(NOW + 5, "cooldown")
