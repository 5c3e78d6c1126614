"""Input-token estimates that learn from what the provider reports after each call."""

from __future__ import annotations

import math

from llm_batch_queue.limits import estimate_tokens


class TokenEstimator:
    """Tokens per character, per model, as an exponential moving average of observed usage.

    Over-estimates waste quota and under-estimates risk 429s, so each reconciliation pulls the
    ratio toward what the provider counted. The headroom added on top follows how far the
    estimates have been off: the mean relative error (an EMA too, starting at `headroom - 1`),
    times `spread`, never below `min_headroom - 1`. A model whose counts the length predicts
    well is soon reserved at almost exactly what it uses; one whose ratio varies keeps a margin.

    When the provider's own count is known before the call (`counted`), the estimate is that
    count, scaled up by how much more than its count the provider has been charging (some
    providers charge a little framing that countTokens leaves out); never scaled down.
    """

    def __init__(
        self,
        initial_ratio: float = 0.25,
        weight: float = 0.3,
        headroom: float = 1.05,
        spread: float = 2.0,
        min_headroom: float = 1.01,
    ):
        self._initial = initial_ratio
        self._weight = weight
        self._prior_error = headroom - 1.0
        self._spread = spread
        self._floor = min_headroom - 1.0
        self._ratios: dict[str, float] = {}
        self._errors: dict[str, float] = {}  # mean relative error of the ratio, per model
        self._count_factors: dict[str, float] = {}

    def headroom(self, model: str) -> float:
        error = self._errors.get(model)
        if error is None:
            return 1.0 + self._prior_error
        return 1.0 + max(self._floor, min(self._prior_error * 4, self._spread * error))

    def estimate(self, model: str, text: str, counted: int | None = None) -> int:
        if counted is not None:
            return max(1, math.ceil(counted * max(1.0, self._count_factors.get(model, 1.0))))
        return estimate_tokens(text, self._ratios.get(model, self._initial) * self.headroom(model))

    def observe(
        self, model: str, text: str, actual_tokens: int, counted: int | None = None
    ) -> None:
        if not text or actual_tokens <= 0:
            return
        observed = actual_tokens / len(text)
        old = self._ratios.get(model, self._initial)
        self._ratios[model] = old + self._weight * (observed - old)
        error = abs(observed - old) / old
        before = self._errors.get(model, self._prior_error)
        self._errors[model] = before + self._weight * (error - before)
        if counted:
            factor = self._count_factors.get(model, 1.0)
            self._count_factors[model] = factor + self._weight * (actual_tokens / counted - factor)
