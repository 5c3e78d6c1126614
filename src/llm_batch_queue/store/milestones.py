"""Outbox rows for pipeline milestones, shared by every Store.

Each Store calls these inside the transaction that caused the milestone; the (run, kind, key)
uniqueness of the outbox makes every milestone fire at most once per round. A run's round (1, then
+1 each time an admin retry reopens the finished run) is part of the stage_complete and
run_finished keys after the first ("analyze@2", "@2"), so a reopened run reports them again.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from llm_batch_queue.jobs import JSON, Item, JobStatus, RunCounts, RunStatus, Scope, StageSpec

AddNotification = Callable[[str, str, str, JSON, float], None]

RUN_QUEUED = "run_queued"
STAGE_COMPLETE = "stage_complete"
ITEM_FAILED = "item_failed"
RUN_FINISHED = "run_finished"
KINDS = frozenset({RUN_QUEUED, STAGE_COMPLETE, ITEM_FAILED, RUN_FINISHED})


def in_round(key: str, round_: int) -> str:
    return key if round_ <= 1 else f"{key}@{round_}"


def final_key(round_: int) -> str:
    """The run_finished row's key in a round: the run's final notification."""
    return in_round("", round_)


@dataclass(frozen=True, slots=True)
class Milestones:
    run_id: str
    kinds: Collection[str]
    add: AddNotification
    round: int = 1

    def _in_round(self, key: str) -> str:
        return in_round(key, self.round)

    def _emit(self, kind: str, key: str, payload: JSON, now: float) -> None:
        if kind in self.kinds:
            self.add(self.run_id, kind, key, payload, now)

    def run_queued(self, items: int, now: float) -> None:
        self._emit(RUN_QUEUED, "", {"items": items}, now)

    def item_failed(self, item: Item, now: float) -> None:
        # keyed by the failure count, so a retried item that fails again is reported again
        payload = {"item_key": item.key, "error": item.error, "failure": item.failures}
        self._emit(ITEM_FAILED, f"{item.key}#{item.failures}", payload, now)

    def stages_settled(
        self, counts: RunCounts, stages: Mapping[str, StageSpec], now: float
    ) -> None:
        for name, spec in stages.items():
            if spec.scope is not Scope.ITEM:
                continue
            by_status = {
                st: n for (stage, st), n in counts.jobs_by_stage_status.items() if stage == name
            }
            if by_status and all(JobStatus(st).settled for st in by_status):
                self._emit(
                    STAGE_COMPLETE,
                    self._in_round(name),
                    {"stage": name, "jobs": by_status},
                    now,
                )

    def run_finished(self, status: RunStatus, counts: RunCounts, now: float) -> None:
        payload = {"status": status.value, "items": counts.items_by_status}
        self._emit(RUN_FINISHED, self._in_round(""), payload, now)
