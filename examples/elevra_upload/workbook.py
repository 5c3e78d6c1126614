"""The results workbook: one row per input row, saying what became of it; a summary; and the
batches that need re-upload.

Sheets: ``Results`` (unlike the original's single sheet, §6, every row carries an outcome and,
when it needs re-upload, the reason), ``Summary`` (rows per outcome, batches per status, stage
timings, fallbacks, failures, tokens and cost per model) and ``Needs re-upload`` (each failed
batch with its rows, the stage it failed at and why). Any text that a spreadsheet program would
read as a formula (``=``, ``+``, ``-``, ``@``, tab, CR) is written as a text cell with a quote
prefix, on every sheet, so an uploaded cell (or a file name, or a model's error message) can never
run as a formula in the workbook that is e-mailed back (CSV/formula injection).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from pathlib import Path
from typing import Literal, Protocol
from zoneinfo import ZoneInfo

from openpyxl import Workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE, Cell, MergedCell
from openpyxl.styles import Font, PatternFill
from openpyxl.utils import get_column_letter
from openpyxl.worksheet.worksheet import Worksheet

from llm_batch_queue.summary import ModelPrice, RunSummary

from .batches import Batch
from .ingest import CandidateRow, RejectedRow
from .store import InsertResult

__all__ = [
    "DEFAULT_CANDIDATE_BASE_URL",
    "FailedBatch",
    "Outcome",
    "ResultRow",
    "RunFacts",
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
_OUTCOMES: dict[Outcome, str] = {
    "inserted": "Rows inserted",
    "already present": "Rows already present",
    "needs re-upload": "Rows needing re-upload",
}
Value = str | int | float | date | None
_BATCH_STATUS = {"needs_reupload": "needing re-upload"}


@dataclass(frozen=True)
class FailedBatch:
    """One line of the Needs re-upload sheet."""

    key: str  # what `retry RUN_ID KEY` takes
    label: str
    rows: int
    stage: str  # where it stopped: the stage that gave up, "skipped", or "reading the file"
    reason: str
    failures: int = 1  # times it ended needing re-upload (retried ones count each time)


@dataclass(frozen=True)
class RunFacts:
    """What the Summary sheet says about the run beyond the rows: the store's run summary at
    the time the workbook is built, and how to show it."""

    summary: RunSummary
    tz: str = "UTC"
    prices: Mapping[str, ModelPrice] = field(default_factory=dict)
    lines: Sequence[tuple[str, Value]] = ()  # extra lines, first: the file, rows read …


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
    facts: RunFacts | None = None,
    failed: Sequence[FailedBatch] = (),
) -> Path:
    """Write ``Results`` (sorted by input row), ``Summary``, ``Needs re-upload`` and, if given,
    ``Notes``."""
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
    _style(sheet, [1])
    _summary_sheet(book.create_sheet("Summary"), ordered, facts)
    _failed_sheet(book.create_sheet("Needs re-upload"), failed)
    if notes:
        notes_sheet = book.create_sheet("Notes")
        notes_sheet.append(["Note"])
        for note in notes:
            _write(notes_sheet.cell(notes_sheet.max_row + 1, 1), note)
        _style(notes_sheet, [1])
    path = Path(path)
    book.save(path)
    return path


def _summary_sheet(sheet: Worksheet, rows: Sequence[ResultRow], facts: RunFacts | None) -> None:
    headers: list[int] = []
    at = 0

    def line(*values: Value, header: bool = False) -> None:
        nonlocal at
        at += 1
        for column, value in enumerate(values, start=1):
            _write(sheet.cell(at, column), value)
        if header:
            headers.append(at)

    line("Summary", "Value", header=True)
    for title, value in facts.lines if facts else ():
        line(title, value)
    outcomes = Counter(r.outcome for r in rows)
    line("Rows", len(rows))
    for outcome, title in _OUTCOMES.items():
        line(title, outcomes.get(outcome, 0))
    if facts is not None:
        _run_lines(line, facts)
    _style(sheet, headers)


def _run_lines(line: _Line, facts: RunFacts) -> None:
    s, zone = facts.summary, ZoneInfo(facts.tz)

    def local(epoch: float | None) -> datetime | None:
        # Excel has no time zones: local wall time, the zone named in the label
        return None if epoch is None else datetime.fromtimestamp(epoch, zone).replace(tzinfo=None)

    line("Batches", s.items_total)
    for status, n in s.items_by_status.items():
        line(f"Batches {_BATCH_STATUS.get(status, status)}", n)
    line("Batch failures (each failure of a retried batch counted)", s.item_failures)
    line(f"Queued at ({facts.tz})", local(s.run.created_at))
    line("Model and stage attempts (before this workbook was built)", s.attempts)
    line("Attempts that failed", s.failed_attempts)
    for kind, n in s.failures_by_kind.items():
        line(f"  failed: {kind.replace('_', ' ')}", n)
    line("Successes on a fallback model", s.fallbacks)
    line("Input tokens", s.input_tokens)
    line("Output tokens (thinking included)", s.output_tokens)
    total = s.total_cost_usd(facts.prices)
    unpriced = [m for m, c in s.costs(facts.prices).items() if c is None]
    line(
        "Estimated cost (USD)",
        round(total, 4) if total is not None else f"n/a: no price for {', '.join(unpriced)}",
    )
    line()
    line(
        "Stage",
        "Succeeded",
        "Failed",
        "Cancelled",
        "Attempts",
        "Failed attempts",
        "Fallback successes",
        f"First start ({facts.tz})",
        f"Last finish ({facts.tz})",
        "Duration (s)",
        header=True,
    )
    for st in s.stages:
        jobs = st.jobs_by_status
        if not st.attempts and not set(jobs) - {"pending", "ready", "running"}:
            continue  # not started: the workbook stage itself, while it builds this
        duration = st.duration_s
        line(
            st.name,
            jobs.get("succeeded", 0),
            jobs.get("failed", 0),
            jobs.get("cancelled", 0),
            st.attempts,
            st.failed_attempts,
            st.fallbacks,
            local(st.first_started_at),
            local(st.last_finished_at),
            None if duration is None else round(duration, 1),
        )
    line()
    line(
        "Model",
        "Attempts",
        "Succeeded",
        "Input tokens",
        "Output tokens",
        "Thinking tokens",
        "Cost (USD)",
        header=True,
    )
    costs = s.costs(facts.prices)
    for m in s.models:
        cost = costs.get(m.model)
        line(
            m.model,
            m.attempts,
            m.succeeded,
            m.input_tokens,
            m.output_tokens,
            m.thinking_tokens,
            "no price" if cost is None else round(cost, 4),
        )


class _Line(Protocol):
    def __call__(self, *values: Value, header: bool = False) -> None: ...


def _failed_sheet(sheet: Worksheet, failed: Sequence[FailedBatch]) -> None:
    sheet.append(["Batch key", "Batch", "Rows", "Stage", "Reason", "Failures"])
    for at, f in enumerate(failed, start=2):
        values: tuple[Value, ...] = (f.key, f.label, f.rows, f.stage, f.reason, f.failures)
        for column, value in enumerate(values, start=1):
            _write(sheet.cell(at, column), value)
    _style(sheet, [1])


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


def _write(cell: Cell | MergedCell, value: Value) -> None:
    if isinstance(value, str):
        text = ILLEGAL_CHARACTERS_RE.sub("", value)  # control characters openpyxl refuses
        cell.value = text
        if text.startswith(FORMULA_PREFIXES):
            cell.data_type = "s"  # openpyxl made "=…" a formula; force a string cell
            cell.quotePrefix = True  # and Excel keeps it text even when the cell is edited
    elif isinstance(value, datetime):
        cell.value = value
        cell.number_format = "yyyy-mm-dd hh:mm:ss"
    elif isinstance(value, date):
        cell.value = value
        cell.number_format = "mm/dd/yyyy"
    else:
        cell.value = value  # a number or None


_HEADER_FILL = PatternFill("solid", fgColor="1F4E78")
_HEADER_FONT = Font(bold=True, color="FFFFFF")


def _style(sheet: Worksheet, header_rows: Sequence[int]) -> None:
    """Header rows white on dark blue, the first frozen; columns as wide as their text (within
    reason); a filter on a table sheet."""
    for at in header_rows:
        for cell in sheet[at]:
            if cell.value is not None:
                cell.font = _HEADER_FONT
                cell.fill = _HEADER_FILL
    for column in range(1, sheet.max_column + 1):
        letter = get_column_letter(column)
        width = max(_width(c.value) for c in sheet[letter])
        sheet.column_dimensions[letter].width = min(max(width + 2, 8), 60)
    sheet.freeze_panes = "A2"
    if list(header_rows) == [1]:
        sheet.auto_filter.ref = sheet.dimensions


def _width(value: object) -> int:
    if isinstance(value, datetime):
        return 19
    if isinstance(value, date):
        return 10
    return len(str(value or ""))
