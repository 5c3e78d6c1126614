"""Retry and fallback as one pure decision, table-tested in tests/test_retry.py."""

from __future__ import annotations

import random
from dataclasses import dataclass

from llm_batch_queue._frozen import fast_init
from llm_batch_queue.errors import (
    CallError,
    ConfigError,
    ErrorKind,
    QuotaScope,
    RateLimited,
    TooLarge,
)
from llm_batch_queue.jobs import GiveUp, Job, Outcome, Retry
from llm_batch_queue.limits import next_day_start


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_delay_s: float = 2.0
    max_delay_s: float = 300.0
    jitter: float = 0.5  # fraction of each delay drawn at random, so retries don't align
    switch_after: int = 2  # counted failures in a row on one model before trying the next
    rate_limit_base_s: float = 5.0  # 429 without RetryInfo: this, doubled per 429 in a row
    not_found_block_s: float = 3600.0

    def __post_init__(self) -> None:
        delays = (self.base_delay_s, self.max_delay_s, self.rate_limit_base_s)
        if min(delays) < 0 or self.not_found_block_s < 0:
            raise ConfigError("retry delays must not be negative")
        if not 0 <= self.jitter <= 1 or self.switch_after < 1:
            raise ConfigError("jitter must be within 0..1 and switch_after at least 1")

    def backoff(self, n: int, rng: random.Random) -> float:
        delay = min(self.max_delay_s, self.base_delay_s * (2 ** max(0, n - 1)))
        return float(delay * (1 - self.jitter) + delay * self.jitter * rng.random())


@fast_init
@dataclass(frozen=True, slots=True)
class ModelBlock:
    """Tells every dispatcher to keep off a model until `until` (shared through the Store)."""

    model: str
    until: float
    reason: str  # cooldown | day | not_found


@fast_init
@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    block: ModelBlock | None = None


def decide(
    policy: RetryPolicy,
    models: tuple[str, ...],
    job: Job,
    error: CallError,
    now: float,
    *,
    day_tz: str,
    rate_limit_streak: int = 0,
    rng: random.Random | None = None,
) -> Decision:
    """What to do after `error` on `models[job.model_index]` (or a stage with no model)."""
    rng = rng or random.Random()
    idx = job.model_index
    model = models[idx] if idx < len(models) else None
    has_next = idx + 1 < len(models)

    if isinstance(error, RateLimited) and model is not None:
        if error.scope is QuotaScope.DAY:
            reset = next_day_start(now, day_tz)
            block = ModelBlock(model, reset, "day")
            if has_next:
                return Decision(Retry(now, idx + 1, f"{model}: daily quota spent", False), block)
            return Decision(Retry(reset, idx, f"{model}: daily quota spent", False), block)
        delay = error.retry_after_s
        if delay is None:
            delay = min(policy.max_delay_s, policy.rate_limit_base_s * 2**rate_limit_streak)
        block = ModelBlock(model, now + delay, "cooldown")
        return Decision(Retry(now + delay, idx, f"{model}: rate limited", False), block)

    if error.kind is ErrorKind.MODEL_NOT_FOUND and model is not None:
        block = ModelBlock(model, now + policy.not_found_block_s, "not_found")
        if has_next:
            return Decision(Retry(now, idx + 1, f"{model}: model not found", False), block)
        return Decision(GiveUp(f"no usable model: {error.message}"), block)

    if isinstance(error, TooLarge) and has_next:  # no attempt burned: nothing was sent
        return Decision(Retry(now, idx + 1, f"{model}: {error.message}", False))

    if error.kind is ErrorKind.PERMANENT:
        return Decision(GiveUp(f"permanent error: {error.message}"))

    attempts = job.attempts + 1
    if attempts >= job.max_attempts:
        return Decision(GiveUp(f"gave up after {attempts} attempts: {error.message}"))
    next_idx = idx + 1 if has_next and job.model_failures + 1 >= policy.switch_after else idx
    at = now + policy.backoff(attempts, rng)
    return Decision(Retry(at, next_idx, f"{error.kind.value}: {error.message}"))
