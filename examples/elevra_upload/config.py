"""The app's settings: read from the environment in this one place, overridable by CLI flags."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from email.utils import parseaddr
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from llm_batch_queue.errors import ConfigError
from llm_batch_queue.limits import ModelLimits
from llm_batch_queue.limits_config import DEFAULT_KEY, limits_from_env
from llm_batch_queue.notify import SMTPSettings
from llm_batch_queue.summary import ModelPrice, load_prices

# Gemini API "Tier 2" limits as published for these models; override with ELEVRA_LIMITS or
# --limits (JSON text, or a .json/.toml file: see llm_batch_queue.limits_config) when your
# project's tier differs (the Gemini console shows your real numbers).
DEFAULT_LIMITS: dict[str, ModelLimits] = {
    "gemini-2.5-pro": ModelLimits(rpm=1000, tpm=5_000_000, rpd=50_000),
    "gemini-2.5-flash": ModelLimits(rpm=2000, tpm=3_000_000, rpd=100_000),
    "gemini-2.5-flash-lite": ModelLimits(rpm=4000, tpm=4_000_000),
}


# USD per million tokens as Google published them for these models (standard tier, prompts up to
# 200k tokens; thinking billed as output); override with ELEVRA_PRICES when they change
DEFAULT_PRICES: dict[str, ModelPrice] = {
    "gemini-2.5-pro": ModelPrice(input_per_mtok=1.25, output_per_mtok=10.0),
    "gemini-2.5-flash": ModelPrice(input_per_mtok=0.30, output_per_mtok=2.50),
    "gemini-2.5-flash-lite": ModelPrice(input_per_mtok=0.10, output_per_mtok=0.40),
}
TRANSPORTS = ("dryrun", "smtp", "resend")
SMTP_SECURITY = ("starttls", "ssl", "none")
# Resend's cap: 40 MB per e-mail, attachments counted after base64 (notify.resend)
DEFAULT_ATTACH_MAX_BYTES = 40_000_000

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
    prices: Mapping[str, ModelPrice] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    # e-mail: dryrun writes OUT/emails.jsonl; smtp and resend send for real
    email_transport: str = "dryrun"
    email_from: str = "Elevra uploads <uploads@example.org>"
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_security: str = "starttls"
    smtp_user: str | None = None
    smtp_password: str | None = field(default=None, repr=False)
    resend_api_key: str | None = field(default=None, repr=False)
    resend_base_url: str = "https://api.resend.com"
    # attachments larger than this (after base64) are stored in attach_dir and linked instead
    attach_max_bytes: int = DEFAULT_ATTACH_MAX_BYTES
    attach_dir: Path | None = None  # default OUT/attachments
    attach_base_url: str | None = None  # where attach_dir is served; else file:// links
    templates_dir: Path | None = None  # your e-mail templates, overriding the app's by name
    email_hold_s: float = 300.0  # a claimed e-mail left unmarked this long is in doubt

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
        for name, value, variable in (
            ("lease_s", self.lease_s, "ELEVRA_LEASE_S"),
            ("concurrency", self.concurrency, "ELEVRA_CONCURRENCY / --concurrency"),
            ("timeout_ms", self.timeout_ms, "GEMINI_TIMEOUT_MS"),
        ):
            if not value > 0:
                raise ConfigError(f"{name} must be positive ({variable}), got {value!r}")
        for variable, chain in (
            ("ELEVRA_ANALYZE_MODELS", self.analyze_models),
            ("ELEVRA_STRUCTURE_MODELS", self.structure_models),
        ):
            if missing := [m for m in chain if not _rate_limited(self.limits.get(m))]:
                listed = [m for m in missing if m in self.limits]
                why = "whose limits set none of rpm, tpm, rpd" if listed else "which has no limits"
                raise ConfigError(
                    f"{variable} uses {', '.join(map(repr, missing))}, {why}: give rpm, tpm or "
                    "rpd in ELEVRA_LIMITS or --limits (unlimited, the dispatcher would send as "
                    "fast as it can and meet the provider's 429s)"
                )
        self._check_email()

    def _check_email(self) -> None:
        if self.email_transport not in TRANSPORTS:
            raise ConfigError(
                f"ELEVRA_EMAIL must be one of {', '.join(TRANSPORTS)}, got {self.email_transport!r}"
            )
        if "@" not in parseaddr(self.email_from)[1]:
            raise ConfigError(f"ELEVRA_EMAIL_FROM has no address: {self.email_from!r}")
        if self.email_transport == "smtp":
            if not self.smtp_host:
                raise ConfigError("ELEVRA_EMAIL=smtp needs ELEVRA_SMTP_HOST")
            if self.smtp_security not in SMTP_SECURITY:
                raise ConfigError(
                    f"ELEVRA_SMTP_SECURITY must be one of {', '.join(SMTP_SECURITY)}, "
                    f"got {self.smtp_security!r}"
                )
            if not 0 < self.smtp_port < 65536:
                raise ConfigError(f"ELEVRA_SMTP_PORT must be a TCP port, got {self.smtp_port}")
            self.smtp_settings()  # its own checks (user and password together, encryption)
        if self.email_transport == "resend" and not self.resend_api_key:
            raise ConfigError("ELEVRA_EMAIL=resend needs RESEND_API_KEY")
        if self.attach_max_bytes < 0 or self.email_hold_s <= 0:
            raise ConfigError("ELEVRA_ATTACH_MAX_BYTES must be >= 0, ELEVRA_EMAIL_HOLD_S > 0")
        if self.templates_dir is not None and not self.templates_dir.is_dir():
            raise ConfigError(f"ELEVRA_TEMPLATES: {self.templates_dir} is not a directory")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AppConfig:
        base = cls()
        analyze = _models(env, "ELEVRA_ANALYZE_MODELS", base.analyze_models)
        structure = _models(env, "ELEVRA_STRUCTURE_MODELS", base.structure_models)
        named = limits_from_env(env, "ELEVRA_LIMITS")
        return cls(
            api_key=env.get("GEMINI_API_KEY") or None,
            gemini_base_url=env.get("ELEVRA_GEMINI_BASE_URL") or None,
            analyze_models=analyze,
            structure_models=structure,
            limits=_merged(base.limits, named, {*analyze, *structure}, "ELEVRA_LIMITS"),
            uploader_email=env.get("ELEVRA_UPLOADER_EMAIL", base.uploader_email),
            team_email=env.get("ELEVRA_TEAM_EMAIL", base.team_email),
            display_tz=env.get("ELEVRA_TIMEZONE", base.display_tz),
            app_url=env.get("ELEVRA_APP_URL", base.app_url),
            hidden=_bool(env, "ELEVRA_HIDDEN", default=True),
            concurrency=_int(env, "ELEVRA_CONCURRENCY", base.concurrency),
            timeout_ms=_int(env, "GEMINI_TIMEOUT_MS", base.timeout_ms),
            lease_s=_seconds(env, "ELEVRA_LEASE_S", base.lease_s),
            prices={**base.prices, **_prices(env)},
            email_transport=_transport(env),
            email_from=env.get("ELEVRA_EMAIL_FROM") or base.email_from,
            smtp_host=env.get("ELEVRA_SMTP_HOST") or None,
            smtp_port=_int(env, "ELEVRA_SMTP_PORT", base.smtp_port),
            smtp_security=env.get("ELEVRA_SMTP_SECURITY") or base.smtp_security,
            smtp_user=env.get("ELEVRA_SMTP_USER") or None,
            smtp_password=env.get("ELEVRA_SMTP_PASSWORD") or None,
            resend_api_key=env.get("RESEND_API_KEY") or None,
            resend_base_url=env.get("ELEVRA_RESEND_BASE_URL") or base.resend_base_url,
            attach_max_bytes=_int(env, "ELEVRA_ATTACH_MAX_BYTES", base.attach_max_bytes),
            attach_dir=_path(env.get("ELEVRA_ATTACH_DIR")),
            attach_base_url=env.get("ELEVRA_ATTACH_BASE_URL") or None,
            templates_dir=_path(env.get("ELEVRA_TEMPLATES")),
            email_hold_s=_int(env, "ELEVRA_EMAIL_HOLD_S", int(base.email_hold_s)),
        )

    def with_limits(self, limits: Mapping[str, ModelLimits], source: str) -> AppConfig:
        """These models' limits (from `source`) in place of theirs; the others keep theirs."""
        used = {*self.analyze_models, *self.structure_models}
        return replace(self, limits=_merged(self.limits, limits, used, source))

    def smtp_settings(self) -> SMTPSettings:
        if self.smtp_host is None:
            raise ConfigError("ELEVRA_EMAIL=smtp needs ELEVRA_SMTP_HOST")
        try:
            return SMTPSettings(
                host=self.smtp_host,
                port=self.smtp_port,
                sender=self.email_from,
                username=self.smtp_user,
                password=self.smtp_password,
                starttls=self.smtp_security == "starttls",
                ssl=self.smtp_security == "ssl",
            )
        except ConfigError as exc:
            raise ConfigError(f"ELEVRA_SMTP_*: {exc}") from None


def _merged(
    limits: Mapping[str, ModelLimits],
    named: Mapping[str, ModelLimits],
    used: set[str],
    source: str,
) -> dict[str, ModelLimits]:
    """`named` replacing those models' limits whole. A model no chain uses is refused: most
    often a typo, which would leave the real model on limits the user meant to change."""
    if DEFAULT_KEY in named:
        # every model here has limits (built in or given), so a default would apply to none
        raise ConfigError(
            f"{source}: {DEFAULT_KEY!r} is not taken here, the models have limits of their own: "
            "list each model whose limits you change, with all of its limits"
        )
    if unused := sorted(set(named) - used):
        raise ConfigError(
            f"{source} sets limits for {', '.join(map(repr, unused))}, which no model chain "
            f"uses (ELEVRA_ANALYZE_MODELS, ELEVRA_STRUCTURE_MODELS: {', '.join(sorted(used))})"
        )
    return {**limits, **named}


def _transport(env: Mapping[str, str]) -> str:
    chosen = env.get("ELEVRA_EMAIL", "").strip().lower()
    if not chosen and env.get("ELEVRA_ENV", "").strip().lower() == "production":
        # in production an unset choice is a mistake, not a quiet dry run
        raise ConfigError("ELEVRA_ENV=production: set ELEVRA_EMAIL to smtp or resend (or dryrun)")
    return chosen or "dryrun"


def _prices(env: Mapping[str, str]) -> dict[str, ModelPrice]:
    value = env.get("ELEVRA_PRICES", "")
    return load_prices(value, "ELEVRA_PRICES") if value.strip() else {}


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def _rate_limited(limits: ModelLimits | None) -> bool:
    return limits is not None and any(x is not None for x in (limits.rpm, limits.tpm, limits.rpd))


def _models(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = env.get(name)
    if not value:
        return default
    models = tuple(m.strip() for m in value.split(",") if m.strip())
    if not models:
        raise ConfigError(f"{name} must name at least one model, got {value!r}")
    if repeated := sorted({m for m in models if models.count(m) > 1}):
        raise ConfigError(
            f"{name} names {', '.join(map(repr, repeated))} more than once: a fallback must be "
            "another model"
        )
    return models


def _bool(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1/true/yes/on or 0/false/no/off, got {env[name]!r}")


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    try:
        value = float(env[name]) if env.get(name) else default
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {env[name]!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a number of seconds, got {env[name]!r}")
    return value


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        return int(env[name]) if env.get(name) else default
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {env[name]!r}") from None
