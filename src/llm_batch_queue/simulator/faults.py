"""Which fault (if any) a request meets: scripted ones first, then seeded random draws."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from llm_batch_queue.simulator.config import FaultConfig


class Fault(StrEnum):
    """Errors (answered before the quota check, never counted) and output faults (after it)."""

    RATE_LIMIT_MINUTE = "429-minute"  # RPM QuotaFailure + RetryInfo
    RATE_LIMIT_TOKENS = "429-tokens"  # TPM QuotaFailure + RetryInfo
    RATE_LIMIT_DAY = "429-day"  # RPD QuotaFailure + RetryInfo until the Pacific reset
    RATE_LIMIT_BARE = "429-bare"  # only a Help detail: no quota id, no RetryInfo
    SERVER_ERROR = "500"
    UNAVAILABLE = "503"
    NOT_FOUND = "404"
    STALL = "stall"
    NOT_JSON = "not-json"
    EMPTY = "empty"
    TRUNCATED = "truncated"

    @property
    def is_error(self) -> bool:
        return self not in _OUTPUT_FAULTS


_OUTPUT_FAULTS = frozenset({Fault.STALL, Fault.NOT_JSON, Fault.EMPTY, Fault.TRUNCATED})


@dataclass(frozen=True, slots=True)
class ForcedFault:
    fault: Fault
    retry_after_s: float | None = None  # for RATE_LIMIT_MINUTE / _TOKENS; None = 30 s


class FaultPlan:
    """Per-model fault state; a per-model RNG keeps other models' traffic from shifting draws."""

    def __init__(self, config: FaultConfig, seed: str) -> None:
        self.config = config
        self._seed = seed
        self._rng = random.Random(seed)
        self._rate_rng = random.Random(f"{seed}:429")
        self._forced: deque[ForcedFault] = deque()

    def force(self, forced: ForcedFault, times: int) -> None:
        self._forced.extend([forced] * times)

    def next_forced(self) -> ForcedFault | None:
        return self._forced.popleft() if self._forced else None

    def draw(self) -> Fault | None:
        c = self.config
        u = self._rng.random()
        for fault, rate in (
            (Fault.SERVER_ERROR, c.server_error_rate),
            (Fault.UNAVAILABLE, c.unavailable_rate),
            (Fault.STALL, c.stall_rate),
            (Fault.NOT_JSON, c.not_json_rate),
            (Fault.EMPTY, c.empty_rate),
            (Fault.TRUNCATED, c.truncated_rate),
        ):
            if u < rate:
                return fault
            u -= rate
        return None

    def rate_limited(self) -> bool:
        """An injected 429, drawn from its own RNG so it does not shift the other faults."""
        rate = self.config.rate_limit_rate
        return rate > 0 and self._rate_rng.random() < rate

    def latency(self) -> float:
        low, high = self.config.latency_s
        return low if low == high else self._rng.uniform(low, high)

    def reset(self) -> None:
        self._rng = random.Random(self._seed)
        self._rate_rng = random.Random(f"{self._seed}:429")
        self._forced.clear()
