"""Per-model settings of the simulator: limits, injected faults and fixed usage quirks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Probabilities (per admitted request) of each random fault, plus response latency.

    The rates are drawn from one uniform number, so together they must not exceed 1.
    """

    server_error_rate: float = 0.0  # 500 INTERNAL
    unavailable_rate: float = 0.0  # 503 UNAVAILABLE
    stall_rate: float = 0.0  # answer only after `stall_s`, long past a client's timeout
    not_json_rate: float = 0.0  # prose where JSON was asked for
    empty_rate: float = 0.0  # a candidate without parts
    truncated_rate: float = 0.0  # half the text, finishReason MAX_TOKENS
    # a per-minute 429 (QuotaFailure + RetryInfo of rate_limit_retry_s) whatever the limits
    # say, drawn before the quota check: the provider's own view of a window can differ
    rate_limit_rate: float = 0.0
    rate_limit_retry_s: float = 2.0
    stall_s: float = 30.0
    latency_s: tuple[float, float] = (0.0, 0.0)  # uniform range; equal ends = fixed latency

    def __post_init__(self) -> None:
        rates = [self.server_error_rate, self.unavailable_rate, self.stall_rate]
        rates += [self.not_json_rate, self.empty_rate, self.truncated_rate]
        if any(r < 0 for r in rates) or sum(rates) > 1:
            raise ValueError(f"fault rates must be >= 0 and sum to <= 1, got {rates}")
        if not 0 <= self.rate_limit_rate <= 1 or self.rate_limit_retry_s < 0:
            raise ValueError(f"bad rate_limit_rate {self.rate_limit_rate} or retry")
        low, high = self.latency_s
        if low < 0 or high < low or self.stall_s < 0:
            raise ValueError(f"bad latency {self.latency_s} or stall {self.stall_s}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Limits of one model; None means unlimited. `tpm` counts input tokens, as Gemini does."""

    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None
    faults: FaultConfig = field(default_factory=FaultConfig)
    thinking_tokens: int = 0  # reported as thoughtsTokenCount on every success
    not_found: bool = False  # answer 404 as if the model had been withdrawn

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "rpd"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")


_LIMIT_KEYS = ("rpm", "tpm", "rpd", "thinking_tokens")
_RATE_KEYS = (
    "server_error_rate",
    "unavailable_rate",
    "stall_rate",
    "not_json_rate",
    "empty_rate",
    "truncated_rate",
    "rate_limit_rate",
    "rate_limit_retry_s",
    "stall_s",
)


def parse_model_spec(spec: str) -> tuple[str, ModelConfig]:
    """Parse the CLI form `NAME[:key=value,...]`, e.g. `gemini-2.5-flash:rpm=10,latency=0.1-0.4`.

    Keys: rpm, tpm, rpd, thinking_tokens, not_found (true/false), latency (`S` or `LOW-HIGH`
    seconds), and the FaultConfig rates plus stall_s.
    """
    name, _, options = spec.partition(":")
    limits: dict[str, Any] = {}
    faults: dict[str, Any] = {}
    not_found = False
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected key=value in {spec!r}, got {item!r}")
        if key in _LIMIT_KEYS:
            limits[key] = int(value)
        elif key in _RATE_KEYS:
            faults[key] = float(value)
        elif key == "latency":
            low, _, high = value.partition("-")
            faults["latency_s"] = (float(low), float(high or low))
        elif key == "not_found":
            not_found = value.lower() in ("1", "true", "yes")
        else:
            raise ValueError(f"unknown model option {key!r} in {spec!r}")
    if not name:
        raise ValueError(f"missing model name in {spec!r}")
    return name, ModelConfig(**limits, faults=FaultConfig(**faults), not_found=not_found)
