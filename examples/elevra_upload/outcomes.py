"""From the queue's items to the results workbook: one row per input row with its outcome, the
run's summary, and the batches that need re-upload."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from examples.elevra_upload.batches import Batch
from examples.elevra_upload.ingest import RejectedRow
from examples.elevra_upload.store import InsertResult
from examples.elevra_upload.workbook import (
    FailedBatch,
    ResultRow,
    RunFacts,
    build_workbook,
    rows_for_batch,
    rows_for_rejected,
)
from llm_batch_queue.jobs import Item, ItemStatus, Job, JobStatus


def batch_label(item: Item) -> str:
    """How people name a batch: its contest, state and date (and part)."""
    try:
        batch = Batch.from_payload(item.payload)
    except (ValueError, TypeError):  # not a batch payload, or cleared by the retention purge
        return item.key
    when = batch.election_date.isoformat() if batch.election_date else batch.year
    part = f" (part {batch.part}/{batch.parts})" if batch.parts > 1 else ""
    return " – ".join(str(p) for p in (batch.contest, batch.state, when) if p) + part


def rejected_to_meta(rejected: Sequence[RejectedRow]) -> list[dict[str, Any]]:
    """Rows the reader refused travel in the run's metadata, so the workbook can list them."""
    return [{"row_number": r.row_number, "reason": r.reason, "values": r.values} for r in rejected]


def result_rows(
    items: Sequence[Item], rejected: Sequence[Mapping[str, Any]] = ()
) -> list[ResultRow]:
    rows: list[ResultRow] = []
    for item in items:
        batch = Batch.from_payload(item.payload)
        inserted = item.outputs.get("insert")
        if item.status is ItemStatus.COMPLETED and inserted:
            found = rows_for_batch(batch, InsertResult.from_payload(inserted))
        else:
            found = rows_for_batch(batch, None, item.error or f"batch is {item.status.value}")
        # listings like the NC one name no municipality column: show the election's city
        rows += [r if r.municipality else replace(r, municipality=batch.city) for r in found]
    refused = [RejectedRow(r["row_number"], r["reason"], dict(r["values"]), {}) for r in rejected]
    return rows + rows_for_rejected(refused)


def failed_batches(
    items: Sequence[Item], jobs: Sequence[Job], rejected: Sequence[Mapping[str, Any]] = ()
) -> list[FailedBatch]:
    """The batches that need re-upload, with the stage they stopped at; then the rows the
    reader refused, one line each."""
    out: list[FailedBatch] = []
    for item in items:
        if item.status is not ItemStatus.NEEDS_REUPLOAD:
            continue
        mine = [j for j in jobs if j.item_id == item.id]
        gave_up = [j.stage for j in mine if j.status is JobStatus.FAILED]
        reason = item.error or "unknown"
        if gave_up:
            stage = gave_up[0]
        elif reason.startswith("skipped"):
            cancelled = [j.stage for j in mine if j.status is JobStatus.CANCELLED]
            stage = f"skipped at {cancelled[0]}" if cancelled else "skipped"
        else:
            stage = "unknown"
        batch = Batch.from_payload(item.payload)
        rows = len(batch.candidates) + len(batch.merged)
        out.append(FailedBatch(item.key, batch_label(item), rows, stage, reason, item.failures))
    for r in rejected:
        out.append(FailedBatch(f"row {r['row_number']}", "", 1, "reading the file", r["reason"]))
    return out


def write_results_workbook(
    items: Sequence[Item],
    path: Path,
    app_url: str,
    rejected: Sequence[Mapping[str, Any]] = (),
    *,
    jobs: Sequence[Job] = (),
    facts: RunFacts | None = None,
) -> int:
    rows = result_rows(items, rejected)
    build_workbook(
        rows,
        path,
        candidate_base_url=app_url.rstrip("/") + "/candidate/",
        facts=facts,
        failed=failed_batches(items, jobs, rejected),
    )
    return len(rows)
