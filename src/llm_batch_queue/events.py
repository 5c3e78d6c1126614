"""Typed events the dispatcher emits; logging, metrics and progress displays subscribe."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from llm_batch_queue._frozen import fast_init


@fast_init
@dataclass(frozen=True, slots=True)
class JobClaimed:
    job_id: str
    run_id: str
    stage: str
    item_key: str | None
    reclaimed: bool


@fast_init
@dataclass(frozen=True, slots=True)
class CallSucceeded:
    job_id: str
    stage: str
    model: str | None
    is_fallback: bool
    input_tokens: int
    output_tokens: int
    latency_s: float


@fast_init
@dataclass(frozen=True, slots=True)
class CallFailed:
    job_id: str
    stage: str
    model: str | None
    error_kind: str
    message: str
    status_code: int | None
    gave_up: bool
    retry_at: float | None


@fast_init
@dataclass(frozen=True, slots=True)
class FellBack:
    job_id: str
    stage: str
    from_model: str
    to_model: str
    reason: str


@fast_init
@dataclass(frozen=True, slots=True)
class Deferred:
    """No quota now: the job went back unrun, to be claimed again at `until`. Said once per
    wait of a stage: while it stays held for the same reason (an in-flight limit is asked
    again every 50 ms), further deferrals are only counted (DispatchStats.deferred)."""

    job_id: str
    stage: str
    model: str
    reason: str
    until: float


@fast_init
@dataclass(frozen=True, slots=True)
class LeaseLost:
    job_id: str
    stage: str


@fast_init
@dataclass(frozen=True, slots=True)
class JobCrashed:
    """An unexpected error that could not be recorded; the job waits for its lease to expire."""

    job_id: str
    stage: str
    message: str


@fast_init
@dataclass(frozen=True, slots=True)
class WaitingForLeases:
    """Nothing to claim here, while `jobs` run under other workers' leases (said once each
    time this dispatcher runs out of work, at most once a minute). A crashed worker's jobs are
    taken over when its leases end, the first at `first_expiry`: until then nothing happens,
    which is no hang. `ending`: this dispatcher stops now instead (a one-shot dispatch)."""

    jobs: int
    first_expiry: float
    ending: bool = False

    def explain(self, now: float) -> str:
        at = time.strftime("%H:%M:%S", time.localtime(self.first_expiry))
        when = f"{at} (in {max(0.0, self.first_expiry - now):.0f} s)"
        running = (
            f"{self.jobs} job{'s' if self.jobs != 1 else ''} running under other workers' leases"
        )
        if self.ending:
            return (
                f"{running}, the first ending at {when}; nothing else is due, so this dispatch "
                "ends: a later one takes them over if their worker has stopped"
            )
        return (
            f"{running}; if their worker has stopped, they are taken over when the leases end, "
            f"the first at {when}"
        )


Event = (
    JobClaimed
    | CallSucceeded
    | CallFailed
    | FellBack
    | Deferred
    | LeaseLost
    | JobCrashed
    | WaitingForLeases
)
EventSink = Callable[[Event], None]
