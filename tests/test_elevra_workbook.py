"""The results workbook: every input row once, with its outcome; formula-like text stays text."""

from __future__ import annotations

import zipfile
from datetime import datetime
from pathlib import Path

import openpyxl
import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import StaticPool

from examples.elevra_upload import store
from examples.elevra_upload.batches import group_rows
from examples.elevra_upload.ingest import RejectedRow, read_rows
from examples.elevra_upload.prompts import render_analyze, render_structure
from examples.elevra_upload.responder import respond
from examples.elevra_upload.schema import parse_structured
from examples.elevra_upload.workbook import (
    FailedBatch,
    ResultRow,
    RunFacts,
    build_workbook,
    rows_for_batch,
    rows_for_rejected,
)
from llm_batch_queue.jobs import Run, RunCounts, RunStatus, Scope, StageSpec
from llm_batch_queue.summary import AttemptGroup, ModelPrice, summarize

T0 = 1_750_000_000.0  # 2025-06-15 15:06:40 UTC
SAMPLES = Path(__file__).parents[1] / "examples" / "elevra_upload" / "samples"
DANGEROUS = [
    "=1+2",
    '=HYPERLINK("https://example.org","x")',
    "+1 555",
    "-2",
    "@SUM(A1)",
    "\tx",
    "\rx",
]


def sample_results(tmp_path: Path, *, fail: str | None = None) -> list[ResultRow]:
    """The NC sample through the simulated pipeline; the batch whose key is ``fail`` fails."""
    engine = create_engine("sqlite://", poolclass=StaticPool)
    store.create_tables(engine)
    rows: list[ResultRow] = []
    for batch in group_rows(read_rows(SAMPLES / "sample_nc.csv").rows):
        if batch.key == fail:
            rows += rows_for_batch(batch, None, "structure step failed 5 times: invalid JSON")
            continue
        structured = parse_structured(
            respond("m", render_structure(batch, respond("m", render_analyze(batch), False)), True)
        )
        rows += rows_for_batch(
            batch, store.insert_batch(engine, structured, batch, "a@example.org", True)
        )
    engine.dispose()
    return rows


def read_sheet(path: Path) -> list[dict[str, object]]:
    sheet = openpyxl.load_workbook(path)["Results"]
    values = list(sheet.iter_rows(values_only=True))
    header = [str(h) for h in values[0]]
    return [dict(zip(header, row, strict=True)) for row in values[1:]]


def test_every_input_row_once_with_its_outcome(tmp_path: Path) -> None:
    path = build_workbook(sample_results(tmp_path), tmp_path / "results.xlsx")
    rows = read_sheet(path)
    assert [r["Row"] for r in rows] == list(range(1, 42))
    assert {r["Outcome"] for r in rows} == {"inserted"}
    merged = [r for r in rows if str(r["Reason"] or "").startswith("same candidate as row")]
    assert len(merged) == 2 and {r["County"] for r in merged} == {"GUILFORD"}
    finalists = [
        r for r in rows if r["Reason"] == "candidate already known; linked to this election"
    ]
    assert len(finalists) == 2  # the Fayetteville finalists, already inserted for the first date
    link = str(rows[0]["Candidate link"])
    assert link.startswith("https://www.elevracommunity.com/candidate/")


def test_failed_batch_rows_need_reupload_with_the_reason(tmp_path: Path) -> None:
    results = sample_results(tmp_path, fail="city of asheville city council|2025-11-04")
    rows = read_sheet(build_workbook(results, tmp_path / "r.xlsx"))
    failed = [r for r in rows if r["Outcome"] == "needs re-upload"]
    assert len(failed) == 6
    assert {r["Reason"] for r in failed} == {"structure step failed 5 times: invalid JSON"}
    assert all(r["Candidate link"] is None for r in failed)


def test_second_run_reports_already_present(tmp_path: Path) -> None:
    engine = create_engine("sqlite://", poolclass=StaticPool)
    store.create_tables(engine)
    batch = group_rows(read_rows(SAMPLES / "sample_template.csv").rows)[0]
    structured = parse_structured(respond("m", render_structure(batch, "{}"), True))
    store.insert_batch(engine, structured, batch, "a@example.org", True)
    again = rows_for_batch(
        batch, store.insert_batch(engine, structured, batch, "a@example.org", True)
    )
    engine.dispose()
    assert {r.outcome for r in again} == {"already present"}


def test_rejected_rows_are_listed(tmp_path: Path) -> None:
    rejected = [
        RejectedRow(7, "election date: impossible date '02/31/2025'", {"full_name": "Ana Lee"}, {})
    ]
    rows = read_sheet(build_workbook(rows_for_rejected(rejected), tmp_path / "r.xlsx"))
    assert rows == [
        {
            "Row": 7,
            "First name": None,
            "Last name": None,
            "Full name": "Ana Lee",
            "Email": None,
            "Municipality": None,
            "County": None,
            "State": None,
            "Position": None,
            "Election date": None,
            "Year": None,
            "Party": None,
            "Outcome": "needs re-upload",
            "Reason": "election date: impossible date '02/31/2025'",
            "Candidate link": None,
        }
    ]


@pytest.mark.parametrize("value", DANGEROUS)
def test_formula_like_text_is_written_as_text(tmp_path: Path, value: str) -> None:
    row = ResultRow(row_number=1, outcome="inserted", full_name=value, party=value, slug="ana-1")
    path = build_workbook([row], tmp_path / "r.xlsx")
    cell = openpyxl.load_workbook(path)["Results"]["D2"]
    assert cell.value == value.replace("\r", "\n")  # XML reading turns a raw CR into LF
    assert cell.data_type == "s"
    assert cell.quotePrefix is True
    with zipfile.ZipFile(path) as archive:
        assert "<f>" not in archive.read("xl/worksheets/sheet1.xml").decode()


def test_formula_cell_from_the_sample_upload_stays_text(tmp_path: Path) -> None:
    path = build_workbook(sample_results(tmp_path), tmp_path / "r.xlsx")
    sheet = openpyxl.load_workbook(path)["Results"]
    names = [c for c in sheet["D"] if isinstance(c.value, str) and c.value.startswith("=")]
    assert [c.value for c in names] == ['=HYPERLINK("https://example.org/vote","Pat Quill")']
    assert names[0].data_type == "s" and names[0].quotePrefix is True
    assert all(c.data_type != "f" for line in sheet.iter_rows() for c in line)


def test_base_url_notes_control_characters_and_layout(tmp_path: Path) -> None:
    rows = [
        ResultRow(row_number=2, outcome="inserted", full_name="Bo\x07 Chen", slug="bo-chen-1"),
        ResultRow(row_number=1, outcome="already present", full_name="Ana Lee", slug="ana-lee-2"),
    ]
    path = build_workbook(
        rows, tmp_path / "r.xlsx", candidate_base_url="https://staging.example.org/c", notes=["=x"]
    )
    book = openpyxl.load_workbook(path)
    sheet = book["Results"]
    assert [c.value for c in sheet["A"]][1:] == [1, 2]  # sorted by input row
    assert sheet["D3"].value == "Bo Chen"  # a control character openpyxl would refuse is dropped
    assert sheet["O2"].value == "https://staging.example.org/c/ana-lee-2"
    assert sheet["O2"].hyperlink is not None
    assert sheet.freeze_panes == "A2" and sheet["A1"].font.bold
    assert sheet.column_dimensions["D"].width >= len("Full name")
    assert book["Notes"]["A2"].value == "=x" and book["Notes"]["A2"].data_type == "s"


def run_facts() -> RunFacts:
    run = Run("r1", "elevra_upload", "=cmd|' /C calc'!A0.csv", RunStatus.RUNNING, {}, T0, None)
    stages = {
        "analyze": StageSpec("analyze", Scope.ITEM),
        "insert": StageSpec("insert", Scope.ITEM, after=("analyze",)),
        "workbook": StageSpec("workbook", Scope.RUN),
    }
    counts = RunCounts(
        {"completed": 2, "needs_reupload": 1},
        {("analyze", "succeeded"): 3, ("insert", "succeeded"): 2, ("insert", "failed"): 1,
         ("workbook", "running"): 1},
    )  # fmt: skip
    groups = [
        AttemptGroup("analyze", "pro", False, None, 2, 2_000_000, 100_000, 0, T0 + 1, T0 + 30),
        AttemptGroup("analyze", "flash", True, None, 1, 1_000, 500, 0, T0 + 40, T0 + 41),
        AttemptGroup("analyze", "pro", False, "rate_limited", 1, 900, 0, 0, T0 + 2, T0 + 3),
        AttemptGroup("insert", None, False, "permanent", 1, 0, 0, 0, T0 + 50, T0 + 51),
        AttemptGroup("insert", None, False, None, 2, 0, 0, 0, T0 + 45, T0 + 60),
    ]
    summary = summarize(run, stages, counts, 1, groups, {"sent": 3})
    return RunFacts(
        summary,
        tz="America/New_York",
        prices={"pro": ModelPrice(1.25, 10.0)},
        lines=[("File", run.name), ("Rows read", 7)],
    )


def summary_values(path: Path) -> dict[str, object]:
    sheet = openpyxl.load_workbook(path)["Summary"]
    return {str(r[0]): r[1] for r in sheet.iter_rows(values_only=True) if r[0] is not None}


def test_summary_sheet_counts_timings_tokens_and_cost(tmp_path: Path) -> None:
    rows = [
        ResultRow(row_number=1, outcome="inserted"),
        ResultRow(row_number=2, outcome="needs re-upload", reason="x"),
    ]
    path = build_workbook(rows, tmp_path / "r.xlsx", facts=run_facts())
    values = summary_values(path)
    assert values["Rows"] == 2 and values["Rows needing re-upload"] == 1
    assert (
        values["Batches needing re-upload"] == 1
        and values["Batch failures (each failure of a retried batch counted)"] == 1
    )
    assert values["Successes on a fallback model"] == 1
    assert values["  failed: rate limited"] == 1 and values["Attempts that failed"] == 2
    assert values["Input tokens"] == 2_001_900
    # flash has no price in the table: no total pretends to be complete
    assert values["Estimated cost (USD)"] == "n/a: no price for flash"
    # 2025-06-15 15:06:40 UTC, shown as New York's wall time, the zone named in the label
    assert values["Queued at (America/New_York)"] == datetime(2025, 6, 15, 11, 6, 40)
    sheet = openpyxl.load_workbook(path)["Summary"]
    table = list(sheet.iter_rows(values_only=True))
    start = next(i for i, r in enumerate(table) if r[0] == "Stage")
    assert table[start + 1][:7] == ("analyze", 3, 0, 0, 4, 1, 1)
    assert table[start + 1][7] == datetime(2025, 6, 15, 11, 6, 41)
    assert table[start + 1][9] == 40.0
    assert table[start + 2][:3] == ("insert", 2, 1)
    assert table[start + 3][0] is None  # the workbook stage, still running, is left out
    models = {r[0]: r for r in table if r[0] in ("pro", "flash")}
    assert models["pro"][6] == pytest.approx(round((2_000_900 * 1.25 + 100_000 * 10.0) / 1e6, 4))
    assert models["flash"][6] == "no price"
    header_rows = [c.row for c in sheet["A"] if c.font.bold]
    assert header_rows == [
        1,
        start + 1,
        next(i for i, r in enumerate(table) if r[0] == "Model") + 1,
    ]
    assert sheet.freeze_panes == "A2"


def test_needs_reupload_sheet_and_formula_text_on_every_sheet(tmp_path: Path) -> None:
    failed = [
        FailedBatch("-batch|2025", "=Mayor – NC", 3, "insert", '=HYPERLINK("http://x","y")', 2),
        FailedBatch("row 7", "", 1, "reading the file", "+no name"),
    ]
    path = build_workbook([], tmp_path / "r.xlsx", facts=run_facts(), failed=failed)
    book = openpyxl.load_workbook(path)
    assert book.sheetnames == ["Results", "Summary", "Needs re-upload"]
    sheet = book["Needs re-upload"]
    assert [c.value for c in sheet[1]] == [
        "Batch key",
        "Batch",
        "Rows",
        "Stage",
        "Reason",
        "Failures",
    ]
    assert [c.value for c in sheet[2]] == [
        "-batch|2025", "=Mayor – NC", 3, "insert", '=HYPERLINK("http://x","y")', 2
    ]  # fmt: skip
    assert [c.value for c in sheet[3]][:5] == ["row 7", None, 1, "reading the file", "+no name"]
    for cell in (sheet["A2"], sheet["B2"], sheet["E2"], sheet["E3"]):
        assert cell.data_type == "s" and cell.quotePrefix
    file_cell = next(c for c in book["Summary"]["B"] if c.value == run_facts().lines[0][1])
    assert file_cell.data_type == "s" and file_cell.quotePrefix
    with zipfile.ZipFile(path) as archive:
        assert not any(
            "<f>" in archive.read(n).decode()
            for n in archive.namelist()
            if n.startswith("xl/worksheets/")
        )
    assert sheet["A1"].font.bold and sheet.freeze_panes == "A2"
    assert sheet.column_dimensions["E"].width >= len('=HYPERLINK("http://x","y")')
