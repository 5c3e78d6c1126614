"""Gemini-style quotas: true sliding 60-second windows and a day that resets at Pacific midnight."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from llm_batch_queue.simulator.config import ModelConfig

PACIFIC = ZoneInfo("America/Los_Angeles")
WINDOW_S = 60.0


class QuotaKind(StrEnum):
    REQUESTS_PER_MINUTE = "requests_per_minute"
    INPUT_TOKENS_PER_MINUTE = "input_tokens_per_minute"
    REQUESTS_PER_DAY = "requests_per_day"

    @property
    def quota_id(self) -> str:
        return _QUOTA_IDS[self]

    @property
    def metric(self) -> str:
        return _METRICS[self]


_QUOTA_IDS = {
    QuotaKind.REQUESTS_PER_MINUTE: "GenerateRequestsPerMinutePerProjectPerModel",
    QuotaKind.INPUT_TOKENS_PER_MINUTE: "GenerateContentInputTokensPerModelPerMinute",
    QuotaKind.REQUESTS_PER_DAY: "GenerateRequestsPerDayPerProjectPerModel",
}
_METRICS = {
    QuotaKind.REQUESTS_PER_MINUTE: "generativelanguage.googleapis.com/generate_content_requests",
    QuotaKind.INPUT_TOKENS_PER_MINUTE: (
        "generativelanguage.googleapis.com/generate_content_input_token_count"
    ),
    QuotaKind.REQUESTS_PER_DAY: "generativelanguage.googleapis.com/generate_content_requests",
}


@dataclass(frozen=True, slots=True)
class Violation:
    """A request the quota refused; `retry_after_s` is when the same request would fit."""

    kind: QuotaKind
    limit: int
    retry_after_s: float


def provider_day(now: float) -> date:
    return datetime.fromtimestamp(now, PACIFIC).date()


def seconds_until_reset(now: float) -> float:
    """Seconds until the next midnight in America/Los_Angeles (DST-aware)."""
    tomorrow = provider_day(now) + timedelta(days=1)
    return datetime.combine(tomorrow, time(0), tzinfo=PACIFIC).timestamp() - now


class QuotaLedger:
    """Admitted requests of one model. A request at t counts in every window (s, s+60] holding t.

    Not thread-safe: the service holds its lock around check + admit.
    """

    def __init__(self) -> None:
        self._window: deque[tuple[float, int]] = deque()  # (admitted at, input tokens)
        self._window_tokens = 0
        self._day: date | None = None
        self._day_requests = 0

    def check(self, config: ModelConfig, now: float, tokens: int) -> Violation | None:
        self._expire(now)
        if config.rpd is not None and self._day_requests >= config.rpd:
            return Violation(QuotaKind.REQUESTS_PER_DAY, config.rpd, seconds_until_reset(now))
        if config.rpm is not None and len(self._window) >= config.rpm:
            # The window admits again once all but rpm-1 of its entries have left it.
            oldest_to_leave = self._window[len(self._window) - config.rpm][0]
            return Violation(
                QuotaKind.REQUESTS_PER_MINUTE, config.rpm, oldest_to_leave + WINDOW_S - now
            )
        if config.tpm is not None and self._window_tokens + tokens > config.tpm:
            return Violation(
                QuotaKind.INPUT_TOKENS_PER_MINUTE,
                config.tpm,
                self._token_wait(config.tpm, now, tokens),
            )
        return None

    def admit(self, now: float, tokens: int) -> None:
        self._expire(now)
        self._window.append((now, tokens))
        self._window_tokens += tokens
        self._day_requests += 1

    def _expire(self, now: float) -> None:
        while self._window and self._window[0][0] <= now - WINDOW_S:
            self._window_tokens -= self._window.popleft()[1]
        day = provider_day(now)
        if day != self._day:
            self._day, self._day_requests = day, 0

    def _token_wait(self, tpm: int, now: float, tokens: int) -> float:
        """Time until enough old entries leave for `tokens` to fit.

        A request larger than the whole budget never fits; it is told to wait for an empty window.
        """
        remaining = self._window_tokens
        leaving_at = now
        for admitted_at, spent in self._window:
            remaining -= spent
            leaving_at = admitted_at + WINDOW_S
            if remaining + tokens <= tpm:
                break
        return max(leaving_at - now, 0.0) if self._window else WINDOW_S
