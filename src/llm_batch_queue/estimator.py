"""Input-token estimates that learn from what the provider reports after each call."""

from __future__ import annotations

from llm_batch_queue.limits import estimate_tokens


class TokenEstimator:
    """Tokens per character, per model, as an exponential moving average of observed usage.

    Over-estimates waste quota and under-estimates risk 429s, so each reconciliation pulls the
    ratio toward what the provider counted. A small headroom keeps early estimates on the safe side.
    """

    def __init__(self, initial_ratio: float = 0.25, weight: float = 0.3, headroom: float = 1.05):
        self._initial = initial_ratio
        self._weight = weight
        self._headroom = headroom
        self._ratios: dict[str, float] = {}

    def estimate(self, model: str, text: str) -> int:
        return estimate_tokens(text, self._ratios.get(model, self._initial) * self._headroom)

    def observe(self, model: str, text: str, actual_tokens: int) -> None:
        if not text or actual_tokens <= 0:
            return
        observed = actual_tokens / len(text)
        old = self._ratios.get(model, self._initial)
        self._ratios[model] = old + self._weight * (observed - old)
