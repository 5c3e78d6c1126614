"""Pipelines: named stages with dependencies, validated when built."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ValidationError

from llm_batch_queue._frozen import fast_init
from llm_batch_queue.adapters.base import JSONSchema, ModelResponse
from llm_batch_queue.errors import ConfigError, InvalidOutput
from llm_batch_queue.jobs import JSON, Item, Lease, Run, Scope, StageSpec


@fast_init
@dataclass(frozen=True, slots=True)
class Prompt:
    """What a model stage sends; the model and token budget come from the stage."""

    text: str
    system: str | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class StageContext:
    """Everything a stage handler may read. Outputs are those of earlier stages of this item."""

    run: Run
    item: Item | None
    stage: str
    attempt: int
    model: str | None = None
    items: Sequence[Item] = ()  # every item of the run, for run-scope stages only
    # the job's lease: store.sql.fence(conn, ctx.lease) makes an effect written in the queue's
    # database commit only while this worker still owns the job
    lease: Lease | None = None

    @property
    def payload(self) -> JSON:
        return self.item.payload if self.item is not None else None

    def output(self, stage: str) -> JSON:
        if self.item is None or stage not in self.item.outputs:
            raise KeyError(f"stage {stage!r} has no output for this item")
        return self.item.outputs[stage]


PromptBuilder = Callable[[StageContext], Prompt]
TaskHandler = Callable[[StageContext], Awaitable[JSON]]


@dataclass(frozen=True, slots=True)
class ModelStage:
    """A stage that calls a model, trying `models` in order (primary first, then fallbacks).

    With `output_type`, the model is asked for JSON matching its schema and the reply is
    validated; invalid replies are retried as InvalidOutput instead of flowing downstream.
    """

    name: str
    models: tuple[str, ...]
    prompt: PromptBuilder
    output_type: type[BaseModel] | None = None
    after: tuple[str, ...] = ()
    max_attempts: int = 5
    priority: int = 0
    max_output_tokens: int | None = None
    temperature: float | None = 0.0
    scope: Scope = Scope.ITEM

    def output_schema(self) -> JSONSchema | None:
        return _json_schema(self.output_type) if self.output_type is not None else None

    def parse(self, response: ModelResponse) -> JSON:
        text = response.text.strip()
        if not text:
            raise InvalidOutput(f"{self.name}: model {response.model} returned empty output")
        if self.output_type is None:
            return text
        try:
            return self.output_type.model_validate_json(_strip_fence(text)).model_dump(mode="json")
        except ValidationError as exc:
            summary = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                for e in exc.errors()[:5]
            )
            raise InvalidOutput(f"{self.name}: output does not match schema: {summary}") from None


@dataclass(frozen=True, slots=True)
class TaskStage:
    """A stage that runs local code and consumes no model quota (insert, workbook, ...)."""

    name: str
    run: TaskHandler
    after: tuple[str, ...] = ()
    scope: Scope = Scope.ITEM
    max_attempts: int = 5
    priority: int = 0


Stage = ModelStage | TaskStage


@dataclass(frozen=True)
class Pipeline:
    name: str
    stages: tuple[Stage, ...]
    # outbox kinds written when milestones happen: "run_queued", "stage_complete", "item_failed",
    # "run_finished". The app's notifier renders and sends them.
    notify: frozenset[str] = field(default_factory=frozenset)
    _by_name: Mapping[str, Stage] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _validate(self.name, self.stages)
        object.__setattr__(self, "_by_name", {s.name: s for s in self.stages})

    def stage(self, name: str) -> Stage:
        try:
            return self._by_name[name]
        except KeyError:
            raise ConfigError(f"pipeline {self.name!r} has no stage {name!r}") from None

    @property
    def specs(self) -> dict[str, StageSpec]:
        return {
            s.name: StageSpec(s.name, s.scope, s.after, s.max_attempts, s.priority)
            for s in self.stages
        }

    @property
    def model_names(self) -> set[str]:
        return {m for s in self.stages if isinstance(s, ModelStage) for m in s.models}


def _validate(name: str, stages: Sequence[Stage]) -> None:
    if not stages:
        raise ConfigError(f"pipeline {name!r} has no stages")
    by_name: dict[str, Stage] = {}
    for s in stages:
        if not s.name or s.name in by_name:
            raise ConfigError(f"pipeline {name!r}: stage name {s.name!r} is empty or repeated")
        if s.max_attempts < 1:
            raise ConfigError(f"stage {s.name!r}: max_attempts must be at least 1")
        if len(s.name) > 200:
            raise ConfigError(f"stage name {s.name[:40]!r}… is longer than 200 characters")
        if isinstance(s, ModelStage):
            if isinstance(s.models, str):
                raise ConfigError(f"stage {s.name!r}: models must be a tuple of names, not a str")
            if not s.models or any(not isinstance(m, str) or not m for m in s.models):
                raise ConfigError(f"stage {s.name!r}: a model stage needs at least one model")
            if len(set(s.models)) < len(s.models):
                raise ConfigError(
                    f"stage {s.name!r}: a model is listed twice in {s.models!r} (a fallback "
                    "must be another model)"
                )
            if not callable(s.prompt):
                raise ConfigError(f"stage {s.name!r}: prompt must be a callable")
        elif not callable(s.run):
            raise ConfigError(f"stage {s.name!r}: run must be an async callable")
        by_name[s.name] = s
    for s in stages:
        for dep in s.after:
            if dep not in by_name:
                raise ConfigError(f"stage {s.name!r} depends on unknown stage {dep!r}")
            if by_name[dep].scope is not s.scope:
                raise ConfigError(
                    f"stage {s.name!r} ({s.scope}) cannot depend on {dep!r} ({by_name[dep].scope});"
                    " run stages already wait for every item"
                )
    _check_acyclic(name, by_name)


def _check_acyclic(name: str, by_name: Mapping[str, Stage]) -> None:
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(stage: str, path: tuple[str, ...]) -> None:
        if state.get(stage) == 2:
            return
        if state.get(stage) == 1:
            raise ConfigError(f"pipeline {name!r} has a cycle: {' -> '.join((*path, stage))}")
        state[stage] = 1
        for dep in by_name[stage].after:
            visit(dep, (*path, stage))
        state[stage] = 2

    for stage in by_name:
        visit(stage, ())


@functools.cache
def _json_schema(model: type[BaseModel]) -> JSONSchema:
    # building a schema walks the whole model; a stage asks for it on every call
    return model.model_json_schema()


def _strip_fence(text: str) -> str:
    """Models sometimes wrap JSON in a Markdown fence even in JSON mode."""
    if text.startswith("```"):
        first_newline = text.find("\n")
        body = text[first_newline + 1 :] if first_newline != -1 else ""
        if body.rstrip().endswith("```"):
            return body.rstrip()[:-3]
    return text
