"""The Store seam: jobs, attempts, leases, the rate ledger, runs/items and the outbox.

Every method is one transaction. Methods that change a job take its lease token and raise
LeaseLost, changing nothing, if the caller no longer holds the lease.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from llm_batch_queue._frozen import fast_init
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
    Reservation,
    Run,
    RunCounts,
    StageSpec,
)
from llm_batch_queue.limits import Deny, ModelLimits
from llm_batch_queue.retry import ModelBlock
from llm_batch_queue.summary import RunSummary


@fast_init
@dataclass(frozen=True, slots=True)
class ModelState:
    model: str
    blocked_until: float
    reason: str | None


# claiming with reservations ---------------------------------------------------------------------
@fast_init
@dataclass(frozen=True, slots=True)
class Booking:
    """What a claim must reserve for a job before handing it out: one request of `tokens`."""

    model: str
    limits: ModelLimits
    tokens: int


@fast_init
@dataclass(frozen=True, slots=True)
class Postpone:
    """Leave the job unclaimed until `at` (no attempt counted): e.g. its models are parked."""

    at: float
    reason: str


Plan = Callable[[ClaimedJob, Callable[[str], ModelState]], Booking | Postpone | None]
"""Called by `claim_work`, inside its transaction, for each job it would hand out, with a lookup
of the models' current blocks: a Booking to reserve (the job is handed out only if it is
admitted), a Postpone, or None (nothing to reserve). It must not call the store."""


@fast_init
@dataclass(frozen=True, slots=True)
class Denied:
    """A job left unclaimed because its model's quota said no."""

    job: Job
    model: str
    deny: Deny


@dataclass(frozen=True, slots=True)
class Claim:
    jobs: list[ClaimedJob] = field(default_factory=list)  # reservation set where one was made
    denied: list[Denied] = field(default_factory=list)


# finishing in batches -----------------------------------------------------------------------
@fast_init
@dataclass(frozen=True, slots=True)
class Used:
    """What a reserved call really used: the provider's input-token count, and when the request
    left (None: as booked). `sent=False`: the request never left, and the booking is undone."""

    reservation: Reservation
    tokens: int
    sent_at: float | None = None
    sent: bool = True


@fast_init
@dataclass(frozen=True, slots=True)
class Completion:
    lease: Lease
    result: AttemptResult
    output: JSON
    used: Used | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class Failure:
    lease: Lease
    result: AttemptResult
    outcome: Outcome
    used: Used | None = None
    block: ModelBlock | None = None  # keep every dispatcher off the model (a 429, a 404)


@fast_init
@dataclass(frozen=True, slots=True)
class Release:
    lease: Lease
    at: float
    reason: str
    used: Used | None = None


Finish = Completion | Failure | Release


@dataclass(frozen=True, slots=True)
class Leased:
    """The jobs running under a lease now, and when the first of those leases ends (then a
    claim may take its job over, if its worker has not renewed it: a crashed one will not)."""

    jobs: int
    first_expiry: float | None


@dataclass(frozen=True, slots=True)
class Purge:
    """What one Store.purge_finished_runs call did."""

    purged: list[str] = field(default_factory=list)  # run ids cleared now
    # past the retention, kept because their final notification is not sent (pending, failed,
    # in doubt): D-29's lesson, nothing of a run goes before the e-mail that reports it
    waiting: list[str] = field(default_factory=list)


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

    def run_summary(self, run_id: str) -> RunSummary:
        """Counts per status, stage timings, fallbacks, failures, tokens per model and the
        outbox's state, aggregated from the run's rows now (nothing is kept up to date on the
        way). KeyError for an unknown run."""
        ...

    def purge_finished_runs(self, retention_s: float, now: float) -> Purge:
        """Clear what a finished run kept of its input and results once it is `retention_s` old:
        the items' payloads and stage outputs and the jobs' outputs (personal data, model
        answers). Counts, statuses, errors, attempts and the outbox stay, so run_summary still
        works. Only runs whose final notification (run_finished, this round) is SENT, when the
        run asked for one. A purged run cannot be retried. One transaction."""
        ...

    # admin actions -------------------------------------------------------------------------------
    def retry_item(
        self, run_id: str, item_key: str, now: float, from_stage: str | None = None
    ) -> Item:
        """Run an item that needs re-upload again, from the stage that failed onward.

        Only a NEEDS_REUPLOAD item of a run not purged (ValueError otherwise; KeyError for an
        unknown run or item).
        Its FAILED and CANCELLED jobs start over (attempt counters reset, attempt history kept);
        SUCCEEDED ones and their outputs are kept, except that `from_stage` starts that stage and
        every item stage after it over too, their outputs cleared (when a later stage failed on
        an earlier one's output; ValueError for a stage the item does not have). The run-scope
        jobs go back to PENDING, so they run again once every item has settled; a finished run
        is reopened in a new round, whose stage_complete and run_finished milestones are written
        again.
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

    def claim_work(
        self,
        *,
        worker: str,
        now: float,
        limit: int,
        lease_s: float,
        plan: Plan,
        stages: Collection[str] | None = None,
        pipeline: str | None = None,
    ) -> Claim:
        """`claim`, with each job's reservation made in the same transaction (see Plan).

        A job whose booking is denied stays as it was (READY, due): the Denied entry says when
        the model frees up. After the first denial on a model, the claim books later jobs on it
        only if they fit without delaying the denied one (backfilling).
        """
        ...

    def next_due(
        self, stages: Collection[str] | None = None, pipeline: str | None = None
    ) -> float | None:
        """When the earliest READY job (or expiring lease) becomes claimable; None if none."""
        ...

    def leased(self, pipeline: str | None = None) -> Leased:
        """The jobs (of `pipeline`'s runs, or all) RUNNING under a lease, whoever holds it."""
        ...

    def heartbeat(self, lease: Lease, now: float, lease_s: float) -> Lease: ...

    def heartbeat_all(
        self, leases: Sequence[Lease], now: float, lease_s: float
    ) -> list[Lease | None]:
        """Renew many leases in one transaction: the renewed lease, or None where it was lost."""
        ...

    def finish(self, batch: Sequence[Finish], now: float) -> list[bool]:
        """Apply completions, failures and releases in one transaction.

        Each one only if its caller still holds the job's lease: the answer is False where it
        did not, and nothing of that job changed, its usage included (so a batch sent again
        after a commit whose answer was lost counts nothing twice; an unreconciled booking
        keeps its estimate). Blocks are applied either way: they only ever move later.
        """
        ...

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
        self,
        reservation: Reservation,
        tokens: int,
        sent_at: float | None = None,
        *,
        sent: bool = True,
    ) -> None:
        """Replace the estimate with the provider's count and end the in-flight booking.

        `sent_at`, when later than the booking, moves the booking to it: the provider's window
        counts the request from when it arrived, and a call can leave well after its booking
        (a busy event loop, a new connection), so a slot must free up 60 s after the send.
        `sent=False`: the request never left, and the booking is undone.
        """
        ...

    def block_model(self, model: str, until: float, reason: str) -> None: ...

    def model_state(self, model: str, now: float) -> ModelState: ...

    # outbox ---------------------------------------------------------------------------------------
    def pending_notifications(self, now: float, limit: int = 50) -> list[Notification]: ...

    def claim_notifications(
        self, now: float, limit: int = 50, hold_s: float = 300.0, *, idempotent: bool = False
    ) -> list[Notification]:
        """Take due rows for sending, committed as SENDING and held for `hold_s` before this
        returns: no other caller gets them while held. `hold_s` must outlast any one send.

        A row still SENDING after its hold lost its sender between claim and mark (a crash, a
        hang), and whether the message left is unknown. With `idempotent` (the caller's
        transport dedupes on Notification.dedupe_key, as Resend does) it is handed out again;
        otherwise it becomes IN_DOUBT and is never sent again unless resolve_notification says
        so: a message may be lost to an admin's decision, but never sent twice.
        """
        ...

    def mark_notification(
        self,
        notification_id: int,
        *,
        sent: bool,
        now: float,
        error: str | None = None,
        retry_at: float | None = None,
        in_doubt: bool = False,
        provider_id: str | None = None,
    ) -> bool:
        """Record a claimed row's send: SENT (with the transport's id); or, not sent, PENDING
        again at `retry_at`, IN_DOUBT (`in_doubt`: it may have left) or else FAILED.

        SENT applies whatever the row's state (news from the transport); the others only to a
        row still SENDING, so a sender that outlived its hold changes nothing another sender or
        claim decided meanwhile. False when nothing changed; KeyError for an unknown id.
        """
        ...

    def resolve_notification(
        self, notification_id: int, *, resend: bool, now: float
    ) -> Notification:
        """An admin's decision on an IN_DOUBT or FAILED row: send it (again) now, or record that
        it was sent. ValueError for a row in any other state; KeyError for an unknown id."""
        ...

    def notifications(self, run_id: str) -> list[Notification]: ...

    def close(self) -> None: ...
