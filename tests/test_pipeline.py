"""Pipelines are validated when built, and the job graph advances by pure rules."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from llm_batch_queue import transitions
from llm_batch_queue.adapters.base import ModelResponse, Usage
from llm_batch_queue.errors import ConfigError, InvalidOutput
from llm_batch_queue.jobs import ItemStatus, JobStatus, Scope, StageSpec
from llm_batch_queue.pipeline import ModelStage, Pipeline, Prompt, StageContext, TaskStage


def prompt(ctx: StageContext) -> Prompt:
    return Prompt("x")


async def task(ctx: StageContext) -> None:
    return None


def test_unknown_dependency_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown stage 'analyse'"):
        Pipeline("p", (ModelStage("structure", ("m",), prompt, after=("analyse",)),))


def test_cycles_are_reported_with_their_path() -> None:
    with pytest.raises(ConfigError, match="cycle"):
        Pipeline("p", (TaskStage("a", task, after=("b",)), TaskStage("b", task, after=("a",))))


def test_item_and_run_stages_do_not_mix_dependencies() -> None:
    with pytest.raises(ConfigError, match="cannot depend"):
        Pipeline("p", (TaskStage("a", task), TaskStage("w", task, scope=Scope.RUN, after=("a",))))


def test_model_stage_needs_a_model_and_names_are_unique() -> None:
    with pytest.raises(ConfigError, match="at least one model"):
        Pipeline("p", (ModelStage("a", (), prompt),))
    with pytest.raises(ConfigError, match="repeated"):
        Pipeline("p", (TaskStage("a", task), TaskStage("a", task)))


class Out(BaseModel):
    name: str
    seats: int


def test_structured_output_is_validated_not_passed_on() -> None:
    stage = ModelStage("s", ("m",), prompt, output_type=Out)
    ok = ModelResponse('```json\n{"name": "x", "seats": 2}\n```', Usage(), "m")
    assert stage.parse(ok) == {"name": "x", "seats": 2}
    with pytest.raises(InvalidOutput, match="seats"):
        stage.parse(ModelResponse('{"name": "x", "seats": "many"}', Usage(), "m"))
    with pytest.raises(InvalidOutput, match="empty"):
        stage.parse(ModelResponse("  ", Usage(), "m"))


STAGES = {
    "a": StageSpec("a", Scope.ITEM),
    "b": StageSpec("b", Scope.ITEM, ("a",)),
    "c": StageSpec("c", Scope.ITEM, ("b",)),
}
P, R, OK, FAIL, X = (
    JobStatus.PENDING,
    JobStatus.READY,
    JobStatus.SUCCEEDED,
    JobStatus.FAILED,
    JobStatus.CANCELLED,
)


@pytest.mark.parametrize(
    ("jobs", "ready", "cancel", "settled", "status"),
    [
        ({"a": OK, "b": P, "c": P}, ("b",), (), False, ItemStatus.RUNNING),
        ({"a": OK, "b": OK, "c": P}, ("c",), (), False, ItemStatus.RUNNING),
        ({"a": OK, "b": OK, "c": OK}, (), (), True, ItemStatus.COMPLETED),
        ({"a": FAIL, "b": P, "c": P}, (), ("b", "c"), True, ItemStatus.NEEDS_REUPLOAD),
        ({"a": OK, "b": FAIL, "c": P}, (), ("c",), True, ItemStatus.NEEDS_REUPLOAD),
        ({"a": R, "b": P, "c": P}, (), (), False, ItemStatus.QUEUED),
    ],
)
def test_item_steps(
    jobs: dict[str, JobStatus],
    ready: tuple[str, ...],
    cancel: tuple[str, ...],
    settled: bool,
    status: ItemStatus,
) -> None:
    step = transitions.item_step(STAGES, jobs)
    assert (step.ready, step.cancel) == (ready, cancel)
    after = {s: (R if s in ready else X if s in cancel else v) for s, v in jobs.items()}
    assert all(v.settled for v in after.values()) is settled
    assert (
        transitions.item_status({s: (X if s in cancel else v) for s, v in jobs.items()}) is status
    )


def test_run_stages_wait_for_every_item() -> None:
    specs = {"w": StageSpec("w", Scope.RUN), "n": StageSpec("n", Scope.RUN, ("w",))}
    assert transitions.run_step(specs, {"w": P, "n": P}, items_settled=False).ready == ()
    assert transitions.run_step(specs, {"w": P, "n": P}, items_settled=True).ready == ("w",)
    assert transitions.run_step(specs, {"w": OK, "n": P}, items_settled=True).ready == ("n",)


def test_a_model_name_string_is_not_mistaken_for_a_chain() -> None:
    with pytest.raises(ConfigError, match="tuple of names"):
        Pipeline("p", (ModelStage("a", "gemini-2.5-flash", prompt),))  # type: ignore[arg-type]
