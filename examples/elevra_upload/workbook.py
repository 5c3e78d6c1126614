"""The results workbook: one row per input row, saying what became of it.

Unlike the original (§6) every row carries an outcome and, when it needs re-upload, the reason. Any
text that a spreadsheet program would read as a formula (``=``, ``+``, ``-``, ``@``, tab, CR) is
written as a text cell with a quote prefix, so an uploaded cell can never run as a formula in the
workbook that is e-mailed back (CSV/formula injection).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Literal

from openpyxl import Workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE, Cell, MergedCell
from openpyxl.styles import Font, PatternFill
from openpyxl.utils import get_column_letter
from openpyxl.worksheet.worksheet import Worksheet

from .batches import Batch
from .ingest import CandidateRow, RejectedRow
from .store import InsertResult

__all__ = [
    "DEFAULT_CANDIDATE_BASE_URL",
    "Outcome",
    "ResultRow",
    "build_workbook",
    "rows_for_batch",
    "rows_for_rejected",
]

DEFAULT_CANDIDATE_BASE_URL = "https://www.elevracommunity.com/candidate/"
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")

Outcome = Literal["inserted", "already present", "needs re-upload"]


@dataclass(frozen=True)
class ResultRow:
    row_number: int | None
    outcome: Outcome
    full_name: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    email: str | None = None
    municipality: str | None = None
    county: str | None = None
    state: str | None = None
    position: str | None = None
    election_date: date | None = None
    year: int | None = None
    party: str | None = None
    reason: str | None = None
    slug: str | None = None


_COLUMNS: tuple[tuple[str, str], ...] = (
    ("Row", "row_number"),
    ("First name", "first_name"),
    ("Last name", "last_name"),
    ("Full name", "full_name"),
    ("Email", "email"),
    ("Municipality", "municipality"),
    ("County", "county"),
    ("State", "state"),
    ("Position", "position"),
    ("Election date", "election_date"),
    ("Year", "year"),
    ("Party", "party"),
    ("Outcome", "outcome"),
    ("Reason", "reason"),
)
_LINK_HEADER = "Candidate link"


def rows_for_batch(
    batch: Batch, result: InsertResult | None, failure: str | None = None
) -> list[ResultRow]:
    """Every input row of a batch, merged duplicates included, with its outcome.

    Pass the insert result of a completed batch, or ``None`` and the reason the batch failed.
    """
    rows = {row.row_number: row for row in batch.candidates}
    outcomes: dict[int, tuple[Outcome, str | None, str | None]] = {}
    if result is None:
        why = failure or "the batch did not complete"
        outcomes = {n: ("needs re-upload", why, None) for n in rows}
    else:
        for done in result.candidates:
            if done.created:
                outcomes[done.row_number] = ("inserted", None, done.slug)
            elif done.linked:
                note = "candidate already known; linked to this election"
                outcomes[done.row_number] = ("inserted", note, done.slug)
            else:
                outcomes[done.row_number] = ("already present", None, done.slug)
        for lost in result.missing:
            outcomes[lost.row_number] = ("needs re-upload", lost.reason, None)
    unknown: tuple[Outcome, str | None, str | None] = ("needs re-upload", "no insert outcome", None)
    out = [_result_row(row, *outcomes.get(n, unknown)) for n, row in rows.items()]
    for merged in batch.merged:
        outcome, reason, slug = outcomes.get(merged.kept_row_number, unknown)
        same = f"same candidate as row {merged.kept_row_number}"
        kept = _result_row(
            rows[merged.kept_row_number], outcome, f"{same}; {reason}" if reason else same, slug
        )
        out.append(replace(kept, row_number=merged.row_number, county=merged.county))
    return out


def rows_for_rejected(rejected: Iterable[RejectedRow]) -> list[ResultRow]:
    """Rows the reader refused (no name, no position, impossible date …)."""
    return [
        ResultRow(
            row_number=r.row_number,
            outcome="needs re-upload",
            reason=r.reason,
            full_name=r.values.get("full_name"),
            first_name=r.values.get("first_name"),
            last_name=r.values.get("last_name"),
            email=r.values.get("email"),
            municipality=r.values.get("municipality"),
            county=r.values.get("county"),
            state=r.values.get("state"),
            position=r.values.get("position"),
            party=r.values.get("party"),
        )
        for r in rejected
    ]


def build_workbook(
    rows: Iterable[ResultRow],
    path: str | Path,
    *,
    candidate_base_url: str = DEFAULT_CANDIDATE_BASE_URL,
    notes: Sequence[str] = (),
) -> Path:
    """Write the ``Results`` sheet (sorted by input row) and, if given, a ``Notes`` sheet."""
    book = Workbook()
    sheet = book.active
    assert sheet is not None  # a new Workbook always has one sheet
    sheet.title = "Results"
    headers = [title for title, _ in _COLUMNS] + [_LINK_HEADER]
    sheet.append(headers)
    base = candidate_base_url.rstrip("/") + "/"
    ordered = sorted(rows, key=lambda r: (r.row_number is None, r.row_number or 0))
    for index, result in enumerate(ordered, start=2):
        for column, (_, attribute) in enumerate(_COLUMNS, start=1):
            _write(sheet.cell(index, column), getattr(result, attribute))
        if result.slug:
            link = sheet.cell(index, len(headers))
            _write(link, base + result.slug)
            link.hyperlink = base + result.slug
            link.style = "Hyperlink"
    _style(sheet, headers)
    if notes:
        notes_sheet = book.create_sheet("Notes")
        notes_sheet.append(["Note"])
        for note in notes:
            _write(notes_sheet.cell(notes_sheet.max_row + 1, 1), note)
        _style(notes_sheet, ["Note"])
    path = Path(path)
    book.save(path)
    return path


def _result_row(
    row: CandidateRow, outcome: Outcome, reason: str | None, slug: str | None
) -> ResultRow:
    return ResultRow(
        row_number=row.row_number,
        outcome=outcome,
        full_name=row.full_name,
        first_name=row.first_name,
        last_name=row.last_name,
        email=row.email,
        municipality=row.municipality,
        county=row.county,
        state=row.state,
        position=row.position,
        election_date=row.election_date,
        year=row.year,
        party=row.party,
        reason=reason,
        slug=slug,
    )


def _write(cell: Cell | MergedCell, value: str | int | date | None) -> None:
    if isinstance(value, str):
        text = ILLEGAL_CHARACTERS_RE.sub("", value)  # control characters openpyxl refuses
        cell.value = text
        if text.startswith(FORMULA_PREFIXES):
            cell.data_type = "s"  # openpyxl made "=…" a formula; force a string cell
            cell.quotePrefix = True  # and Excel keeps it text even when the cell is edited
    elif isinstance(value, date):
        cell.value = value
        cell.number_format = "mm/dd/yyyy"
    else:
        cell.value = value  # int or None


def _style(sheet: Worksheet, headers: Sequence[str]) -> None:
    fill = PatternFill("solid", fgColor="1F4E78")
    for column, title in enumerate(headers, start=1):
        cell = sheet.cell(1, column)
        cell.font = Font(bold=True, color="FFFFFF")
        cell.fill = fill
        width = max(
            [len(title)] + [len(str(c.value or "")) for c in sheet[get_column_letter(column)]]
        )
        sheet.column_dimensions[get_column_letter(column)].width = min(max(width + 2, 8), 60)
    sheet.freeze_panes = "A2"
    sheet.auto_filter.ref = sheet.dimensions
