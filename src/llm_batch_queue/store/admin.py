"""What the admin actions (retry_item, skip_item) allow, and how they word it, for every Store.

The original allowed retry and skip in any state (D-30): retrying a completed or running batch
duplicated its inserts and ran it twice at once, and skipping raced with running jobs (D-10).
Here retry needs an item that needs re-upload, and skip one that is still queued or running.
"""

from __future__ import annotations

from collections.abc import Mapping

from llm_batch_queue.jobs import Item, ItemStatus, Scope, StageSpec

SKIPPABLE = (ItemStatus.QUEUED, ItemStatus.RUNNING)


def not_retryable(item: Item) -> str:
    return (
        f"item {item.key!r} is {item.status.value}: only an item that needs re-upload "
        "(it failed or was skipped) can be retried"
    )


def not_skippable(item: Item) -> str:
    if item.status is ItemStatus.COMPLETED:
        return f"item {item.key!r} is completed: it is done, there is nothing to skip"
    return f"item {item.key!r} is {item.status.value} already (it failed or was skipped)"


def skip_note(reason: str) -> str:
    """The error a skipped item and its cancelled jobs carry."""
    return f"skipped: {reason.strip() or 'marked for re-upload'}"


def purged(run_id: str) -> str:
    return (
        f"run {run_id} was purged (its rows' payloads and outputs were cleared after the "
        "retention period): upload the batch again as a new run"
    )


def rerun_from(stages: Mapping[str, StageSpec], stage: str | None) -> set[str]:
    """The item stages a retry `from stage` runs again: it and every stage after it, directly
    or not (their outputs were made from its output). None: only the stages that failed."""
    if stage is None:
        return set()
    spec = stages.get(stage)
    if spec is None or spec.scope is not Scope.ITEM:
        known = ", ".join(n for n, s in stages.items() if s.scope is Scope.ITEM)
        raise ValueError(f"no item stage {stage!r} to retry from (the item stages: {known})")
    again = {stage}
    grew = True
    while grew:
        more = {n for n, s in stages.items() if s.scope is Scope.ITEM and again & set(s.after)}
        grew = not more <= again
        again |= more
    return again
