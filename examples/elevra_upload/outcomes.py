"""From the queue's items to the results workbook: one row per input row, with its outcome."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from examples.elevra_upload.batches import Batch
from examples.elevra_upload.ingest import RejectedRow
from examples.elevra_upload.store import InsertResult
from examples.elevra_upload.workbook import (
    ResultRow,
    build_workbook,
    rows_for_batch,
    rows_for_rejected,
)
from llm_batch_queue.jobs import Item, ItemStatus


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


def write_results_workbook(
    items: Sequence[Item], path: Path, app_url: str, rejected: Sequence[Mapping[str, Any]] = ()
) -> int:
    rows = result_rows(items, rejected)
    build_workbook(rows, path, candidate_base_url=app_url.rstrip("/") + "/candidate/")
    return len(rows)
