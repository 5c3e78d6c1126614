"""The reference app end to end: real SDK over HTTP to the simulator, SQLite, workbook, mail."""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import openpyxl
import pytest

from examples.elevra_upload.cli import main

SAMPLES = Path(__file__).parents[1] / "examples" / "elevra_upload" / "samples"
NC_FILE = Path(__file__).parents[2] / "shared" / "data" / "nc_candidates_2025.csv"


@pytest.fixture(autouse=True)
def _no_real_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "ELEVRA_LIMITS"):
        monkeypatch.delenv(name, raising=False)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code = main(["run", *args, "--json", "--quiet"])
    out = capsys.readouterr().out.strip().splitlines()
    summary: dict[str, Any] = json.loads(out[-1])
    summary["exit_code"] = code
    return summary


def emails(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "emails.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sample", ["sample_nc.csv", "sample_template.csv", "sample_template.xlsx"])
def test_sample_runs_end_to_end_and_a_rerun_adds_nothing(
    sample: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = run_cli(capsys, str(SAMPLES / sample), "--out", str(tmp_path))
    assert first["exit_code"] == 0
    assert first["batches"] > 0 and first["batches_completed"] == first["batches"]
    assert first["elections"] > 0 and first["candidates"] > 0
    assert first["provider_429"] == 0
    book = openpyxl.load_workbook(first["workbook"], read_only=True)
    results = book["Results"]
    assert results.max_row - 1 == first["rows"]  # one line per input row
    sent = emails(tmp_path)
    assert len(sent) == first["emails"] == 5
    final = sent[-1]
    assert final["subject"].startswith("Upload completed")
    (attachment,) = final["attachments"]
    assert attachment["filename"] == Path(first["workbook"]).name
    reopened = openpyxl.load_workbook(io.BytesIO(base64.b64decode(attachment["content_base64"])))
    assert reopened["Results"].max_row - 1 == first["rows"]

    again = run_cli(capsys, str(SAMPLES / sample), "--out", str(tmp_path))
    assert again["exit_code"] == 0
    assert (again["elections"], again["candidates"]) == (first["elections"], first["candidates"])
    # the re-upload matched every election and candidate: the tables did not grow
    assert (again["db_elections"], again["db_candidates"]) == (
        first["db_elections"],
        first["db_candidates"],
    )
    assert first["db_elections"] == first["elections"]
    assert again["run_id"] != first["run_id"]


def test_bad_input_is_refused_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "people.csv"
    bad.write_text("colour,shape\nred,round\n", encoding="utf-8")
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "column" in err.lower()
    assert main(["run", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "out")]) == 2
    assert "missing.csv" in capsys.readouterr().err


@pytest.mark.skipif(not NC_FILE.exists(), reason="the shared NC candidate file is not present")
def test_the_real_nc_listing_completes_every_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with NC_FILE.open(encoding="cp1252", errors="replace", newline="") as fh:
        rows = list(csv.DictReader(fh))
    elections = {(r["contest_name"].strip().upper(), r["election_dt"]) for r in rows}
    summary = run_cli(capsys, str(NC_FILE), "--out", str(tmp_path))
    assert summary["exit_code"] == 0
    assert summary["rows"] == len(rows) == 3120
    assert summary["batches_completed"] == summary["batches"]
    assert summary["batches_need_reupload"] == 0
    assert summary["elections"] == len(elections)
    assert summary["provider_429"] == 0
    book = openpyxl.load_workbook(summary["workbook"], read_only=True)
    assert book.sheetnames == ["Results", "Summary", "Needs re-upload"]
    assert book["Results"].max_row - 1 == 3120
    facts = {r[0]: r[1] for r in book["Summary"].iter_rows(values_only=True) if r and r[0]}
    assert (facts["Rows"], facts["Rows inserted"], facts["Batches completed"]) == (3120, 3120, 988)
    assert facts["Input tokens"] == summary["input_tokens"]
    assert list(book["Needs re-upload"].iter_rows(values_only=True))[1:] == []
    finals = [e for e in emails(tmp_path) if e["attachments"]]
    assert len(finals) == 1


@pytest.mark.skipif(not NC_FILE.exists(), reason="the shared NC candidate file is not present")
def test_a_slice_of_the_nc_listing_gives_the_three_sheets_and_formula_text_stays_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with NC_FILE.open(encoding="cp1252", errors="replace", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [r for _, r in zip(range(120), reader, strict=False)]
        fields = reader.fieldnames
    assert fields is not None
    rows[3]["name_on_ballot"] = '=HYPERLINK("https://evil.example","Vote here")'
    rows[4]["party_candidate"] = "@SUM(A1:A9)"
    sliced = tmp_path / "nc_slice.csv"
    with sliced.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    summary = run_cli(capsys, str(sliced), "--out", str(tmp_path / "out"))
    assert summary["exit_code"] == 0 and summary["rows"] == 120
    (final,) = [e for e in emails(tmp_path / "out") if e["attachments"]]
    content = base64.b64decode(final["attachments"][0]["content_base64"])
    book = openpyxl.load_workbook(io.BytesIO(content))
    assert book.sheetnames == ["Results", "Summary", "Needs re-upload"]
    results = book["Results"]
    header = [c.value for c in results[1]]
    names = [row[header.index("Full name")] for row in results.iter_rows(min_row=2)]
    [formula] = [c for c in names if str(c.value).startswith("=")]
    assert formula.value == rows[3]["name_on_ballot"]
    assert formula.data_type == "s" and formula.quotePrefix
    with zipfile.ZipFile(io.BytesIO(content)) as archive:  # no formula anywhere, any sheet
        sheets = [n for n in archive.namelist() if n.startswith("xl/worksheets/sheet")]
        assert len(sheets) == 3
        assert all("<f>" not in archive.read(n).decode() for n in sheets)
    for sheet in book:
        assert sheet.freeze_panes == "A2" and sheet["A1"].font.bold


@pytest.mark.skipif(not NC_FILE.exists(), reason="the shared NC candidate file is not present")
def test_a_killed_run_resumes_with_dispatch_and_duplicates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {**os.environ, "ELEVRA_LEASE_S": "3"}
    env.pop("GEMINI_API_KEY", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "examples.elevra_upload",
            "run",
            str(NC_FILE),
            "--out",
            str(tmp_path),
            "--quiet",
        ],
        cwd=Path(__file__).parents[1],
        env=env,
    )
    db = tmp_path / "elevra.db"
    deadline = time.monotonic() + 120
    inserted = 0
    while time.monotonic() < deadline and inserted < 100:
        time.sleep(0.2)
        if db.exists():
            with contextlib.suppress(sqlite3.OperationalError), sqlite3.connect(db) as conn:
                inserted = conn.execute(
                    "select count(*) from lbq_jobs where stage='insert' and status='succeeded'"
                ).fetchone()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 100 <= inserted < 988, "the run was not killed mid-way"

    os.environ["ELEVRA_LEASE_S"] = "3"
    try:
        assert main(["dispatch", "--out", str(tmp_path), "--quiet"]) == 0
    finally:
        del os.environ["ELEVRA_LEASE_S"]
    capsys.readouterr()
    (status,) = json.loads(_last_line(main(["status", "--out", str(tmp_path), "--json"]), capsys))
    assert status["status"] == "completed"
    assert status["batches_completed"] == 988
    assert status["elections"] == 988
    with sqlite3.connect(db) as conn:
        links = conn.execute("select count(*) from elevra_election_links").fetchone()[0]
        payloads = conn.execute("select payload from lbq_items").fetchall()
        stuck = conn.execute(
            "select count(*) from lbq_jobs where status in ('running', 'ready', 'pending')"
        ).fetchone()[0]
    # every candidate of every batch linked to its election exactly once, nothing extra
    expected = sum(len(json.loads(p)["candidates"]) for (p,) in payloads)
    assert links == expected == 2832 and stuck == 0
    finals = [e for e in emails(tmp_path) if e["attachments"]]
    assert len(finals) == 1


def _last_line(code: int, capsys: pytest.CaptureFixture[str]) -> str:
    assert code == 0
    return capsys.readouterr().out.strip().splitlines()[-1]
