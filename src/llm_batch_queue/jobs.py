"""Frozen value types for runs, items, jobs and attempts, shared by every Store."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from llm_batch_queue._frozen import fast_init

JSON = Any  # a value json.dumps accepts


class RunStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"  # every item completed and every run stage succeeded
    COMPLETED_WITH_FAILURES = "completed_with_failures"  # some items need re-upload
    FAILED = "failed"  # a run stage gave up


class ItemStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    NEEDS_REUPLOAD = "needs_reupload"


class JobStatus(StrEnum):
    PENDING = "pending"  # waiting for the stages it depends on
    READY = "ready"
    RUNNING = "running"  # claimed under a lease
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # gave up; its item needs re-upload
    CANCELLED = "cancelled"  # an earlier stage of its item gave up

    @property
    def settled(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Scope(StrEnum):
    ITEM = "item"  # one job per item
    RUN = "run"  # one job per run, after every item has settled


@dataclass(frozen=True, slots=True)
class StageSpec:
    """The part of a stage the Store needs: graph shape, priority, attempt budget."""

    name: str
    scope: Scope
    after: tuple[str, ...] = ()
    max_attempts: int = 5
    priority: int = 0


@dataclass(frozen=True, slots=True)
class NewItem:
    key: str
    payload: JSON


@fast_init
@dataclass(frozen=True, slots=True)
class Run:
    id: str
    pipeline: str
    name: str
    status: RunStatus
    meta: JSON
    created_at: float
    finished_at: float | None
    round: int = 1  # 1, then +1 each time an admin retry reopens the finished run
    # when the retention purge cleared its payloads and outputs (Store.purge_finished_runs)
    purged_at: float | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class Item:
    id: str
    run_id: str
    key: str
    status: ItemStatus
    payload: JSON
    outputs: dict[str, JSON]
    error: str | None
    failures: int  # times this item ended needing re-upload


@fast_init
@dataclass(frozen=True, slots=True)
class Job:
    id: str
    run_id: str
    item_id: str | None
    stage: str
    status: JobStatus
    priority: int
    attempts: int  # attempts that counted against max_attempts
    max_attempts: int
    next_run_at: float
    model_index: int  # position in the stage's model chain to use next
    last_error: str | None
    model_failures: int = 0  # counted failures in a row on the model at model_index
    output: JSON = None
    # start-time fair queueing: claims go by priority, then fair_key. A run's jobs get the
    # virtual time at its creation plus their item's position (run-scope jobs: plus the number
    # of items), so concurrent runs take turns and each run's items progress in order
    fair_key: float = 0.0


@fast_init
@dataclass(frozen=True, slots=True)
class Lease:
    job_id: str
    token: str
    expires_at: float


@fast_init
@dataclass(frozen=True, slots=True)
class Reservation:
    """One booked request: counted in the window from `slot`'s end and in the provider day
    that began at `day` (in `day_tz`), holding `tokens` until reconciled."""

    model: str
    tokens: int
    at: float  # when it was booked
    slot: int  # limits.window_slot(at)
    day: float
    day_tz: str


@fast_init
@dataclass(frozen=True, slots=True)
class ClaimedJob:
    job: Job
    lease: Lease
    run: Run
    item: Item | None
    reclaimed: bool = False  # the previous owner's lease had expired
    reservation: Reservation | None = None  # made in the claim's transaction (Store.claim_work)


@fast_init
@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one attempt did, recorded on completion or failure."""

    started_at: float
    finished_at: float
    model: str | None = None  # None for stages that call no model
    is_fallback: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    thinking_tokens: int = 0
    status_code: int | None = None
    error_kind: str | None = None
    error_message: str | None = None
    counted: bool = True  # False for 429s and lease deferrals: they burn no retries


@fast_init
@dataclass(frozen=True, slots=True)
class Attempt:
    id: int
    job_id: str
    stage: str
    item_key: str | None
    result: AttemptResult


@fast_init
@dataclass(frozen=True, slots=True)
class Retry:
    at: float
    model_index: int
    reason: str
    counted: bool = True  # does this failure use up one of the job's attempts?


@fast_init
@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: str


Outcome = Retry | GiveUp


class NotificationStatus(StrEnum):
    PENDING = "pending"  # due at next_attempt_at
    SENDING = "sending"  # claimed by a sender until next_attempt_at (the claim's hold)
    SENT = "sent"
    FAILED = "failed"  # gave up: a permanent error, or out of attempts
    # a sender claimed it and stopped (crashed, hung) before saying how the send went, and the
    # transport cannot dedupe a second try: it is not sent again until an admin decides
    IN_DOUBT = "in_doubt"


@dataclass(frozen=True, slots=True)
class Notification:
    """An outbox row: written in the transaction that caused it, delivered after commit."""

    id: int
    run_id: str
    kind: str
    key: str
    payload: JSON
    status: NotificationStatus
    attempts: int
    created_at: float
    sent_at: float | None = None
    error: str | None = None
    next_attempt_at: float = 0.0
    provider_id: str | None = None  # what the transport returned: Resend's id, a Message-ID

    @property
    def dedupe_key(self) -> str:
        """Stable for the row across retries, senders and restarts: the idempotency key."""
        return f"{self.run_id}/{self.kind}/{self.key}"


@dataclass(slots=True)
class RunCounts:
    """Aggregates for progress displays and summaries."""

    items_by_status: dict[str, int] = field(default_factory=dict)
    jobs_by_stage_status: dict[tuple[str, str], int] = field(default_factory=dict)

    @property
    def items_total(self) -> int:
        return sum(self.items_by_status.values())
