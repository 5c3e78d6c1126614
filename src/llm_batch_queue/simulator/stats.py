"""What the simulator served, and the peak load it admitted, per model."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from llm_batch_queue.simulator.quota import WINDOW_S, provider_day


@dataclass(frozen=True, slots=True)
class ModelStats:
    """A snapshot. The maxima are exact over every 60-second window, not over clock minutes."""

    requests_by_status: dict[int, int] = field(default_factory=dict)  # generateContent only
    rate_limited: dict[str, int] = field(default_factory=dict)  # QuotaKind value or "unknown"
    count_tokens_requests: int = 0
    admitted: int = 0
    input_tokens: int = 0  # admitted requests' input, as charged against TPM
    output_tokens: int = 0
    thinking_tokens: int = 0
    max_requests_per_window: int = 0
    max_input_tokens_per_window: int = 0
    max_requests_per_day: int = 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["requests_by_status"] = {str(k): v for k, v in self.requests_by_status.items()}
        return data


class ModelTally:
    """Mutable counters behind ModelStats; the service updates it under its lock."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.rate_limited: Counter[str] = Counter()
        self.count_tokens_requests = 0
        self.output_tokens = 0
        self.thinking_tokens = 0
        self.admissions: list[tuple[float, int]] = []  # (admitted at, input tokens)

    def snapshot(self) -> ModelStats:
        admissions = sorted(self.admissions)
        max_requests, max_tokens = _window_maxima(admissions)
        days = Counter(provider_day(at) for at, _ in admissions)
        return ModelStats(
            requests_by_status=dict(sorted(self.statuses.items())),
            rate_limited=dict(sorted(self.rate_limited.items())),
            count_tokens_requests=self.count_tokens_requests,
            admitted=len(admissions),
            input_tokens=sum(tokens for _, tokens in admissions),
            output_tokens=self.output_tokens,
            thinking_tokens=self.thinking_tokens,
            max_requests_per_window=max_requests,
            max_input_tokens_per_window=max_tokens,
            max_requests_per_day=max(days.values(), default=0),
        )


def _window_maxima(admissions: list[tuple[float, int]]) -> tuple[int, int]:
    """Peak count and token sum over windows (t-60, t], t ranging over admission times.

    Some window with the peak always ends on an admission, so checking those is exhaustive.
    """
    max_requests = max_tokens = tokens = start = 0
    for end, (at, spent) in enumerate(admissions):
        tokens += spent
        while admissions[start][0] <= at - WINDOW_S:
            tokens -= admissions[start][1]
            start += 1
        max_requests = max(max_requests, end - start + 1)
        max_tokens = max(max_tokens, tokens)
    return max_requests, max_tokens
