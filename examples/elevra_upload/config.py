"""The app's settings: read from the environment in this one place, overridable by CLI flags."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from llm_batch_queue.errors import ConfigError
from llm_batch_queue.limits import ModelLimits
from llm_batch_queue.limits_config import limits_from_env

# Gemini API "Tier 2" limits as published for these models; override with ELEVRA_LIMITS or
# --limits (JSON text, or a .json/.toml file: see llm_batch_queue.limits_config) when your
# project's tier differs (the Gemini console shows your real numbers).
DEFAULT_LIMITS: dict[str, ModelLimits] = {
    "gemini-2.5-pro": ModelLimits(rpm=1000, tpm=5_000_000, rpd=50_000),
    "gemini-2.5-flash": ModelLimits(rpm=2000, tpm=3_000_000, rpd=100_000),
    "gemini-2.5-flash-lite": ModelLimits(rpm=4000, tpm=4_000_000),
}


_EMAIL = re.compile(r"[^@\s<>,;]+@[^@\s<>,;]+\.[^@\s<>,;]+")


@dataclass(frozen=True)
class AppConfig:
    api_key: str | None = None
    # a Gemini-compatible endpoint instead of the public API: a shared simulator, a proxy
    gemini_base_url: str | None = None
    analyze_models: tuple[str, ...] = ("gemini-2.5-pro", "gemini-2.5-flash")
    structure_models: tuple[str, ...] = ("gemini-2.5-flash", "gemini-2.5-flash-lite")
    limits: Mapping[str, ModelLimits] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    uploader_email: str = "admin@example.org"
    team_email: str = "team@example.org"
    display_tz: str = "America/New_York"
    app_url: str = "https://www.elevracommunity.com"
    hidden: bool = True
    max_candidates_per_batch: int = 40
    concurrency: int = 32
    timeout_ms: int = 120_000
    lease_s: float = 60.0  # a crashed worker's jobs are taken over after this long

    def __post_init__(self) -> None:
        # checked before anything is enqueued: a bad setting must not leave a half-made upload
        try:
            ZoneInfo(self.display_tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"unknown time zone {self.display_tz!r} (ELEVRA_TIMEZONE)") from None
        for name in ("uploader_email", "team_email"):
            address = getattr(self, name)
            if address and not _EMAIL.fullmatch(address):
                raise ConfigError(f"{name} is not a plain e-mail address: {address!r}")
        if self.lease_s <= 0 or self.concurrency < 1 or self.timeout_ms <= 0:
            raise ConfigError("lease, concurrency and timeout settings must be positive")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AppConfig:
        base = cls()
        # a model named here replaces its default limits whole; the others keep theirs
        limits = {**base.limits, **limits_from_env(env, "ELEVRA_LIMITS")}
        return cls(
            api_key=env.get("GEMINI_API_KEY") or None,
            gemini_base_url=env.get("ELEVRA_GEMINI_BASE_URL") or None,
            analyze_models=_models(env.get("ELEVRA_ANALYZE_MODELS"), base.analyze_models),
            structure_models=_models(env.get("ELEVRA_STRUCTURE_MODELS"), base.structure_models),
            limits=limits,
            uploader_email=env.get("ELEVRA_UPLOADER_EMAIL", base.uploader_email),
            team_email=env.get("ELEVRA_TEAM_EMAIL", base.team_email),
            display_tz=env.get("ELEVRA_TIMEZONE", base.display_tz),
            app_url=env.get("ELEVRA_APP_URL", base.app_url),
            hidden=env.get("ELEVRA_HIDDEN", "1") != "0",
            concurrency=_int(env, "ELEVRA_CONCURRENCY", base.concurrency),
            timeout_ms=_int(env, "GEMINI_TIMEOUT_MS", base.timeout_ms),
            lease_s=_int(env, "ELEVRA_LEASE_S", int(base.lease_s)),
        )


def _models(value: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        return default
    models = tuple(m.strip() for m in value.split(",") if m.strip())
    if not models:
        raise ConfigError("a model list must name at least one model")
    return models


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        return int(env[name]) if env.get(name) else default
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {env[name]!r}") from None
