"""The Store seam: jobs, attempts, leases, the rate ledger, runs/items and the outbox.

Every method is one transaction. Methods that change a job take its lease token and raise
LeaseLost, changing nothing, if the caller no longer holds the lease.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from llm_batch_queue.jobs import (
    JSON,
    Attempt,
    AttemptResult,
    ClaimedJob,
    Item,
    Job,
    Lease,
    NewItem,
    Notification,
    Outcome,
    Run,
    RunCounts,
    StageSpec,
)
from llm_batch_queue.limits import Deny, ModelLimits


@dataclass(frozen=True, slots=True)
class Reservation:
    id: int
    model: str
    tokens: int
    at: float


@dataclass(frozen=True, slots=True)
class ModelState:
    model: str
    blocked_until: float
    reason: str | None


class Store(Protocol):
    # runs and items ------------------------------------------------------------------------
    def create_run(
        self,
        *,
        pipeline: str,
        name: str,
        stages: Mapping[str, StageSpec],
        items: Sequence[NewItem],
        meta: JSON,
        now: float,
        notify: Collection[str] = (),
    ) -> Run: ...

    def get_run(self, run_id: str) -> Run: ...

    def list_runs(self) -> list[Run]: ...

    def items(self, run_id: str) -> list[Item]: ...

    def jobs(self, run_id: str) -> list[Job]: ...

    def attempts(self, run_id: str) -> list[Attempt]: ...

    def counts(self, run_id: str) -> RunCounts: ...

    # admin actions -------------------------------------------------------------------------------
    def retry_item(self, run_id: str, item_key: str, now: float) -> Item:
        """Run an item that needs re-upload again, from the stage that failed onward.

        Only a NEEDS_REUPLOAD item (ValueError otherwise; KeyError for an unknown run or item).
        Its FAILED and CANCELLED jobs start over (attempt counters reset, attempt history kept);
        SUCCEEDED ones and their outputs are kept. The run-scope jobs go back to PENDING, so they
        run again once every item has settled; a finished run is reopened in a new round, whose
        stage_complete and run_finished milestones are written again.
        """
        ...

    def skip_item(self, run_id: str, item_key: str, reason: str, now: float) -> Item:
        """Give up on a QUEUED or RUNNING item now: it ends NEEDS_REUPLOAD.

        Its unsettled jobs are cancelled (a worker still running one gets LeaseLost and changes
        nothing), the item_failed milestone is written and the run advances as after any
        settlement. ValueError for a COMPLETED or NEEDS_REUPLOAD item; KeyError if unknown.
        """
        ...

    # claiming and finishing ------------------------------------------------------------------
    def claim(
        self,
        *,
        worker: str,
        now: float,
        limit: int,
        lease_s: float,
        stages: Collection[str] | None = None,
        pipeline: str | None = None,
    ) -> list[ClaimedJob]:
        """Take up to `limit` runnable jobs, reclaiming any whose lease has expired.

        `stages` and `pipeline` restrict the claim to jobs this caller knows how to run.
        """
        ...

    def next_due(
        self, stages: Collection[str] | None = None, pipeline: str | None = None
    ) -> float | None:
        """When the earliest READY job (or expiring lease) becomes claimable; None if none."""
        ...

    def heartbeat(self, lease: Lease, now: float, lease_s: float) -> Lease: ...

    def complete(self, lease: Lease, result: AttemptResult, output: JSON, now: float) -> None:
        """Record success, store the output and release dependents, atomically."""
        ...

    def fail(self, lease: Lease, result: AttemptResult, outcome: Outcome, now: float) -> None:
        """Record a failed attempt and either schedule the retry or give up."""
        ...

    def release(self, lease: Lease, at: float, reason: str, now: float) -> None:
        """Hand the job back unrun (no attempt recorded), claimable again at `at`."""
        ...

    # rate ledger --------------------------------------------------------------------------------
    def reserve(
        self, model: str, limits: ModelLimits, tokens: int, now: float
    ) -> Reservation | Deny:
        """Book one request of `tokens` input tokens if every window allows it, else say when."""
        ...

    def reconcile(
        self, reservation: Reservation, tokens: int, sent_at: float | None = None
    ) -> None:
        """Replace the estimate with the provider's count and end the in-flight booking.

        `sent_at`, when later than the booking, moves the booking to it: the provider's window
        counts the request from when it arrived, and a call can leave well after its booking
        (a busy event loop, a new connection), so a slot must free up 60 s after the send.
        """
        ...

    def block_model(self, model: str, until: float, reason: str) -> None: ...

    def model_state(self, model: str, now: float) -> ModelState: ...

    # outbox ---------------------------------------------------------------------------------------
    def pending_notifications(self, now: float, limit: int = 50) -> list[Notification]: ...

    def claim_notifications(
        self, now: float, limit: int = 50, hold_s: float = 300.0
    ) -> list[Notification]:
        """Take due rows for sending; other callers see them again only after `hold_s`."""
        ...

    def mark_notification(
        self,
        notification_id: int,
        *,
        sent: bool,
        now: float,
        error: str | None = None,
        retry_at: float | None = None,
    ) -> None: ...

    def notifications(self, run_id: str) -> list[Notification]: ...

    def close(self) -> None: ...
