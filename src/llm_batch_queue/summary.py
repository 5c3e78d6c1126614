"""What a run did, computed on demand from the store's rows (Store.run_summary).

Nothing is counted on the way: the finish path, which every job goes through, writes no summary.
A summary is a few aggregate queries over the run's items, jobs, attempts and outbox rows, so it
is always exact and costs nothing until someone asks (a status page, the workbook, an e-mail).
It stays computable after a retention purge, which keeps these rows and clears only payloads and
outputs.

Cost is a view over the token counts through a price table (USD per million tokens), which
changes more often than the code: `ModelPrice`, `load_prices`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_batch_queue.errors import ConfigError
from llm_batch_queue.jobs import JSON, Attempt, Run, RunCounts, StageSpec
from llm_batch_queue.limits_config import read_document


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens. Output includes thinking tokens, as Gemini bills them."""

    input_per_mtok: float
    output_per_mtok: float

    def __post_init__(self) -> None:
        for name in ("input_per_mtok", "output_per_mtok"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"ModelPrice.{name}: a price is a number >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class AttemptGroup:
    """Attempts of one stage on one model with one outcome: the unit the stores aggregate."""

    stage: str
    model: str | None
    is_fallback: bool
    error_kind: str | None  # None: the attempt succeeded
    attempts: int
    input_tokens: int
    output_tokens: int
    thinking_tokens: int
    first_started_at: float
    last_finished_at: float


@dataclass(frozen=True, slots=True)
class StageSummary:
    name: str
    jobs_by_status: dict[str, int]
    attempts: int
    failed_attempts: int  # 429s and lease deferrals included: every attempt that did not succeed
    fallbacks: int  # attempts that succeeded on a fallback model
    first_started_at: float | None
    last_finished_at: float | None

    @property
    def duration_s(self) -> float | None:
        if self.first_started_at is None or self.last_finished_at is None:
            return None
        return self.last_finished_at - self.first_started_at


@dataclass(frozen=True, slots=True)
class ModelUsage:
    model: str
    attempts: int
    succeeded: int
    input_tokens: int
    output_tokens: int
    thinking_tokens: int

    def cost_usd(self, price: ModelPrice) -> float:
        billed_out = self.output_tokens + self.thinking_tokens
        return (self.input_tokens * price.input_per_mtok + billed_out * price.output_per_mtok) / 1e6


@dataclass(frozen=True, slots=True)
class RunSummary:
    run: Run
    items_by_status: dict[str, int]
    item_failures: int  # times items ended needing re-upload, retried ones counted each time
    stages: tuple[StageSummary, ...]  # in the pipeline's order
    models: tuple[ModelUsage, ...]  # by name
    failures_by_kind: dict[str, int] = field(default_factory=dict)  # failed attempts
    notifications_by_status: dict[str, int] = field(default_factory=dict)

    @property
    def items_total(self) -> int:
        return sum(self.items_by_status.values())

    @property
    def attempts(self) -> int:
        return sum(s.attempts for s in self.stages)

    @property
    def fallbacks(self) -> int:
        return sum(s.fallbacks for s in self.stages)

    @property
    def failed_attempts(self) -> int:
        return sum(s.failed_attempts for s in self.stages)

    @property
    def input_tokens(self) -> int:
        return sum(m.input_tokens for m in self.models)

    @property
    def output_tokens(self) -> int:
        return sum(m.output_tokens + m.thinking_tokens for m in self.models)

    def stage(self, name: str) -> StageSummary:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} in run {self.run.id}")

    def costs(self, prices: Mapping[str, ModelPrice]) -> dict[str, float | None]:
        """USD per model; None for a model the table has no price for."""
        return {
            m.model: m.cost_usd(prices[m.model]) if m.model in prices else None for m in self.models
        }

    def total_cost_usd(self, prices: Mapping[str, ModelPrice]) -> float | None:
        """The sum over every model, or None if any model used has no price."""
        costs = self.costs(prices).values()
        return None if any(c is None for c in costs) else sum(c or 0.0 for c in costs)

    def to_json(self, prices: Mapping[str, ModelPrice] | None = None) -> JSON:
        costs = self.costs(prices) if prices is not None else {}
        return {
            "run_id": self.run.id,
            "status": self.run.status.value,
            "round": self.run.round,
            "created_at": self.run.created_at,
            "finished_at": self.run.finished_at,
            "items": self.items_by_status,
            "item_failures": self.item_failures,
            "stages": [
                {
                    "name": s.name,
                    "jobs": s.jobs_by_status,
                    "attempts": s.attempts,
                    "failed_attempts": s.failed_attempts,
                    "fallbacks": s.fallbacks,
                    "first_started_at": s.first_started_at,
                    "last_finished_at": s.last_finished_at,
                }
                for s in self.stages
            ],
            "models": [
                {
                    "model": m.model,
                    "attempts": m.attempts,
                    "succeeded": m.succeeded,
                    "input_tokens": m.input_tokens,
                    "output_tokens": m.output_tokens,
                    "thinking_tokens": m.thinking_tokens,
                    **({"cost_usd": costs.get(m.model)} if prices is not None else {}),
                }
                for m in self.models
            ],
            "failures_by_kind": self.failures_by_kind,
            "notifications": self.notifications_by_status,
            **({"cost_usd": self.total_cost_usd(prices)} if prices is not None else {}),
        }


def summarize(
    run: Run,
    stages: Mapping[str, StageSpec],
    counts: RunCounts,
    item_failures: int,
    groups: Sequence[AttemptGroup],
    notifications_by_status: Mapping[str, int],
) -> RunSummary:
    """Assemble a RunSummary from the aggregates every Store computes the same way."""
    by_stage: dict[str, list[AttemptGroup]] = {}
    by_model: dict[str, list[AttemptGroup]] = {}
    failures: dict[str, int] = {}
    for g in groups:
        by_stage.setdefault(g.stage, []).append(g)
        if g.model is not None:
            by_model.setdefault(g.model, []).append(g)
        if g.error_kind is not None:
            failures[g.error_kind] = failures.get(g.error_kind, 0) + g.attempts
    stage_summaries = []
    for name in stages:
        mine = by_stage.get(name, [])
        stage_summaries.append(
            StageSummary(
                name=name,
                jobs_by_status={
                    status: n
                    for (stage, status), n in sorted(counts.jobs_by_stage_status.items())
                    if stage == name
                },
                attempts=sum(g.attempts for g in mine),
                failed_attempts=sum(g.attempts for g in mine if g.error_kind is not None),
                fallbacks=sum(g.attempts for g in mine if g.is_fallback and g.error_kind is None),
                first_started_at=min((g.first_started_at for g in mine), default=None),
                last_finished_at=max((g.last_finished_at for g in mine), default=None),
            )
        )
    models = tuple(
        ModelUsage(
            model=model,
            attempts=sum(g.attempts for g in mine),
            succeeded=sum(g.attempts for g in mine if g.error_kind is None),
            input_tokens=sum(g.input_tokens for g in mine),
            output_tokens=sum(g.output_tokens for g in mine),
            thinking_tokens=sum(g.thinking_tokens for g in mine),
        )
        for model, mine in sorted(by_model.items())
    )
    return RunSummary(
        run=run,
        items_by_status=dict(sorted(counts.items_by_status.items())),
        item_failures=item_failures,
        stages=tuple(stage_summaries),
        models=models,
        failures_by_kind=dict(sorted(failures.items())),
        notifications_by_status=dict(sorted(notifications_by_status.items())),
    )


def group_attempts(attempts: Iterable[Attempt]) -> list[AttemptGroup]:
    """The GROUP BY of the SQL store, in Python (MemoryStore)."""
    groups: dict[tuple[str, str | None, bool, str | None], AttemptGroup] = {}
    for a in attempts:
        r = a.result
        key = (a.stage, r.model, r.is_fallback, r.error_kind)
        g = groups.get(key)
        groups[key] = AttemptGroup(
            *key,
            attempts=(g.attempts if g else 0) + 1,
            input_tokens=(g.input_tokens if g else 0) + r.input_tokens,
            output_tokens=(g.output_tokens if g else 0) + r.output_tokens,
            thinking_tokens=(g.thinking_tokens if g else 0) + r.thinking_tokens,
            first_started_at=min(g.first_started_at, r.started_at) if g else r.started_at,
            last_finished_at=max(g.last_finished_at, r.finished_at) if g else r.finished_at,
        )
    return list(groups.values())


def load_prices(source: str | os.PathLike[str], var: str | None = None) -> dict[str, ModelPrice]:
    """A price table from JSON text or a .json/.toml file: USD per million tokens per model,

        {"gemini-2.5-pro": {"input": 1.25, "output": 10.0}}

    `var`, the environment variable it came from, is named in errors. Raises ConfigError.
    """
    data, origin = read_document(source, var, "prices")
    if not isinstance(data, dict):
        raise ConfigError(
            f'{origin}: expected an object of models, like {{"m": {{"input": 1.25, "output": 10}}}}'
        )
    out: dict[str, ModelPrice] = {}
    for model, entry in data.items():
        if not isinstance(entry, dict) or set(entry) != {"input", "output"}:
            raise ConfigError(
                f"{origin}: model {model!r}: expected exactly the keys 'input' and 'output' "
                f"(USD per million tokens), got {entry!r}"
            )
        try:
            out[model] = ModelPrice(_number(entry["input"]), _number(entry["output"]))
        except ConfigError as exc:
            raise ConfigError(f"{origin}: model {model!r}: {exc}") from None
    return out


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"a price is a number, got {value!r}")
    return float(value)
