"""Input-token estimates that learn from what the provider reports after each call."""

from __future__ import annotations

import math

from llm_batch_queue.limits import estimate_tokens


class TokenEstimator:
    """Tokens per character, per model, as an exponential moving average of observed usage.

    Over-estimates waste quota and under-estimates risk 429s, so each reconciliation pulls the
    ratio toward what the provider counted. A small headroom keeps early estimates on the safe side.

    When the provider's own count is known before the call (`counted`), the estimate is that
    count, scaled up by how much more than its count the provider has been charging (some
    providers charge a little framing that countTokens leaves out); never scaled down.
    """

    def __init__(self, initial_ratio: float = 0.25, weight: float = 0.3, headroom: float = 1.05):
        self._initial = initial_ratio
        self._weight = weight
        self._headroom = headroom
        self._ratios: dict[str, float] = {}
        self._count_factors: dict[str, float] = {}

    def estimate(self, model: str, text: str, counted: int | None = None) -> int:
        if counted is not None:
            return max(1, math.ceil(counted * max(1.0, self._count_factors.get(model, 1.0))))
        return estimate_tokens(text, self._ratios.get(model, self._initial) * self._headroom)

    def observe(
        self, model: str, text: str, actual_tokens: int, counted: int | None = None
    ) -> None:
        if not text or actual_tokens <= 0:
            return
        observed = actual_tokens / len(text)
        old = self._ratios.get(model, self._initial)
        self._ratios[model] = old + self._weight * (observed - old)
        if counted:
            factor = self._count_factors.get(model, 1.0)
            self._count_factors[model] = factor + self._weight * (actual_tokens / counted - factor)
