"""The results workbook: every input row once, with its outcome; formula-like text stays text."""

from __future__ import annotations

import zipfile
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
    ResultRow,
    build_workbook,
    rows_for_batch,
    rows_for_rejected,
)

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
