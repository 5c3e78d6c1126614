"""Conversions between table rows and the value types of jobs.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

from sqlalchemy import Column, ColumnElement, Row, null

from llm_batch_queue.jobs import (
    JSON,
    Attempt,
    AttemptResult,
    Item,
    ItemStatus,
    Job,
    JobStatus,
    Notification,
    NotificationStatus,
    Run,
    RunStatus,
    Scope,
    StageSpec,
)
from llm_batch_queue.store.sql.tables import items, jobs

# a row of any width: selects of a column list are typed by their column count
AnyRow: TypeAlias = Row[*tuple[Any, ...]]


def stages_to_json(stages: Mapping[str, StageSpec]) -> JSON:
    # a list, not an object: JSONB does not keep key order, and stage order decides the order
    # in which simultaneous milestones are written
    return [
        {
            "name": name,
            "scope": spec.scope.value,
            "after": list(spec.after),
            "max_attempts": spec.max_attempts,
            "priority": spec.priority,
        }
        for name, spec in stages.items()
    ]


def stages_from_json(data: JSON) -> dict[str, StageSpec]:
    return {
        d["name"]: StageSpec(
            name=d["name"],
            scope=Scope(d["scope"]),
            after=tuple(d["after"]),
            max_attempts=d["max_attempts"],
            priority=d["priority"],
        )
        for d in data
    }


def to_run(row: Row[Any]) -> Run:
    m = row._mapping
    return Run(
        m["id"],
        m["pipeline"],
        m["name"],
        RunStatus(m["status"]),
        m["meta"],
        m["created_at"],
        m["finished_at"],
        m["round"],
        m["purged_at"],
    )


ITEM_COLUMNS: tuple[Column[Any], ...] = tuple(
    items.c[name]
    for name in ("id", "run_id", "key", "status", "payload", "outputs", "error", "failures")
)
ITEM_STATUS = 3  # the position of status in ITEM_COLUMNS


def to_item(row: AnyRow, status: ItemStatus | None = None) -> Item:
    """The item of a row of ITEM_COLUMNS (by position, see to_job); `status` in place of the
    stored one, if given."""
    id_, run_id, key, stored, payload, outputs, error, failures = row
    status = status or ItemStatus(stored)
    return Item(id_, run_id, key, status, payload, dict(outputs), error, failures)


# what to_job reads: hot paths select these rather than the whole row (a job row has 24
# columns, and each costs the driver and SQLAlchemy work on every row fetched)
JOB_COLUMNS: tuple[Column[Any], ...] = tuple(
    jobs.c[name]
    for name in (
        "id", "run_id", "item_id", "stage", "status", "priority", "attempts", "max_attempts",
        "next_run_at", "model_index", "last_error", "model_failures", "output", "fair_key",
    )
)  # fmt: skip
# the same for jobs not settled yet, whose output is always empty (only a completion writes
# one, and an admin retry clears it): NULL costs nothing, where JSON null is parsed on each row
OPEN_JOB_COLUMNS: tuple[ColumnElement[Any], ...] = (
    *JOB_COLUMNS[:12],
    null().label("output"),
    *JOB_COLUMNS[13:],
)


def to_job(row: AnyRow, status: JobStatus | None = None) -> Job:
    """The job of a row that starts with JOB_COLUMNS (by position: a named lookup per column
    costs more than the rest of the conversion); `status` in place of the stored one."""
    id_, run_id, item_id, stage, stored, priority, attempts, max_attempts, *rest = row[:14]
    next_run_at, model_index, last_error, model_failures, output, fair_key = rest
    return Job(
        id_,
        run_id,
        item_id,
        stage,
        status or JobStatus(stored),
        priority,
        attempts,
        max_attempts,
        next_run_at,
        model_index,
        last_error,
        model_failures,
        output,
        fair_key,
    )


def attempt_values(
    job_id: str, stage: str, item_id: str | None, result: AttemptResult
) -> dict[str, Any]:
    """An attempt row as claims.record_attempts writes it: the item's key is looked up from
    `item_id` in the same statement."""
    return {
        "job_id": job_id,
        "stage": stage,
        "item_id": item_id,
        "model": result.model,
        "is_fallback": result.is_fallback,
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "input_tokens": result.input_tokens,
        "output_tokens": result.output_tokens,
        "thinking_tokens": result.thinking_tokens,
        "status_code": result.status_code,
        "error_kind": result.error_kind,
        "error_message": result.error_message,
        "counted": result.counted,
    }


def to_attempt(row: Row[Any]) -> Attempt:
    m = row._mapping
    result = AttemptResult(
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        model=m["model"],
        is_fallback=m["is_fallback"],
        input_tokens=m["input_tokens"],
        output_tokens=m["output_tokens"],
        thinking_tokens=m["thinking_tokens"],
        status_code=m["status_code"],
        error_kind=m["error_kind"],
        error_message=m["error_message"],
        counted=m["counted"],
    )
    return Attempt(m["id"], m["job_id"], m["stage"], m["item_key"], result)


def to_notification(row: Row[Any]) -> Notification:
    m = row._mapping
    return Notification(
        id=m["id"],
        run_id=m["run_id"],
        kind=m["kind"],
        key=m["key"],
        payload=m["payload"],
        status=NotificationStatus(m["status"]),
        attempts=m["attempts"],
        created_at=m["created_at"],
        sent_at=m["sent_at"],
        error=m["error"],
        next_attempt_at=m["next_attempt_at"],
        provider_id=m["provider_id"],
    )
