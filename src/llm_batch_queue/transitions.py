"""The job graph's state machine as pure functions, shared by every Store.

A Store loads the statuses of one item's jobs (or a run's), asks these functions what follows, and
applies the answer in the same transaction as the change that caused it. Keeping the rules here
means the in-memory and SQL stores cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from llm_batch_queue.jobs import ItemStatus, JobStatus, RunStatus, Scope, StageSpec

_OPEN = (JobStatus.PENDING, JobStatus.READY)


@dataclass(frozen=True, slots=True)
class GraphStep:
    """What changes after a job of this item (or run) settled."""

    ready: tuple[str, ...] = ()  # stages whose jobs become READY now
    cancel: tuple[str, ...] = ()  # stages whose open jobs are cancelled
    settled: bool = False  # every job of the item/run has settled


def item_step(stages: Mapping[str, StageSpec], jobs: Mapping[str, JobStatus]) -> GraphStep:
    """Given one item's job statuses by stage, what must follow."""
    return _step(stages, jobs)


def item_status(jobs: Mapping[str, JobStatus]) -> ItemStatus:
    # a cancelled job follows a failed sibling, or an admin skip: either way the item is stuck
    # until it is re-uploaded (or retried)
    if any(s is JobStatus.FAILED or s is JobStatus.CANCELLED for s in jobs.values()):
        return ItemStatus.NEEDS_REUPLOAD
    if all(s is JobStatus.SUCCEEDED for s in jobs.values()):
        return ItemStatus.COMPLETED
    if all(s in _OPEN for s in jobs.values()):
        return ItemStatus.QUEUED
    return ItemStatus.RUNNING


def run_step(
    stages: Mapping[str, StageSpec], jobs: Mapping[str, JobStatus], items_settled: bool
) -> GraphStep:
    """Run-scope jobs start only once every item has settled."""
    if not items_settled:
        return GraphStep()
    return _step(stages, jobs)


def run_status(run_jobs: Mapping[str, JobStatus], item_statuses: Mapping[str, int]) -> RunStatus:
    if any(s is JobStatus.FAILED or s is JobStatus.CANCELLED for s in run_jobs.values()):
        return RunStatus.FAILED
    if not all(s is JobStatus.SUCCEEDED for s in run_jobs.values()):
        return RunStatus.RUNNING
    if item_statuses.get(ItemStatus.NEEDS_REUPLOAD.value, 0):
        return RunStatus.COMPLETED_WITH_FAILURES
    return RunStatus.COMPLETED


def initial_status(spec: StageSpec) -> JobStatus:
    """Item stages without dependencies start READY; run stages wait for the items."""
    if spec.scope is Scope.ITEM and not spec.after:
        return JobStatus.READY
    return JobStatus.PENDING


def _step(stages: Mapping[str, StageSpec], jobs: Mapping[str, JobStatus]) -> GraphStep:
    if any(s is JobStatus.FAILED or s is JobStatus.CANCELLED for s in jobs.values()):
        cancel = tuple(name for name, s in jobs.items() if s in _OPEN)
        remaining = [s for name, s in jobs.items() if name not in cancel]
        return GraphStep(cancel=cancel, settled=all(s.settled for s in remaining))
    ready = tuple(
        name
        for name, s in jobs.items()
        if s is JobStatus.PENDING
        and all(jobs.get(dep) is JobStatus.SUCCEEDED for dep in stages[name].after)
    )
    return GraphStep(ready=ready, settled=all(s.settled for s in jobs.values()))
