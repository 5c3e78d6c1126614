"""What the admin actions (retry_item, skip_item) allow, and how they word it, for every Store.

The original allowed retry and skip in any state (D-30): retrying a completed or running batch
duplicated its inserts and ran it twice at once, and skipping raced with running jobs (D-10).
Here retry needs an item that needs re-upload, and skip one that is still queued or running.
"""

from __future__ import annotations

from llm_batch_queue.jobs import Item, ItemStatus

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
