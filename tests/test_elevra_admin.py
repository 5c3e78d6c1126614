"""The app's admin commands end to end: `retry` and `skip` one batch of an upload."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
from pathlib import Path
from typing import Any

import openpyxl
import pytest
from sqlalchemy import create_engine, inspect

from examples.elevra_upload import pipeline
from examples.elevra_upload.app import open_app
from examples.elevra_upload.batches import group_rows
from examples.elevra_upload.cli import main
from examples.elevra_upload.config import AppConfig
from examples.elevra_upload.ingest import read_rows
from examples.elevra_upload.store import InsertError
from llm_batch_queue.errors import ConfigError
from llm_batch_queue.store.sql import open_store

SAMPLE = Path(__file__).parents[1] / "examples" / "elevra_upload" / "samples" / "sample_nc.csv"


@pytest.fixture(autouse=True)
def _no_real_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "ELEVRA_LIMITS"):
        monkeypatch.delenv(name, raising=False)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any] | None, str]:
    """Exit code, the --json summary (if printed) and stderr."""
    code = main(list(args))
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else None), captured.err


def emails(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "emails.jsonl").read_text().splitlines()]


def outcomes(attachment: dict[str, Any]) -> list[str]:
    book = openpyxl.load_workbook(io.BytesIO(base64.b64decode(attachment["content_base64"])))
    rows = list(book["Results"].iter_rows(values_only=True))
    column = rows[0].index("Outcome")
    return [str(r[column]) for r in rows[1:]]


def table_counts(out: Path) -> list[int]:
    """Rows in the app's elections, candidates and election-candidate links."""
    with sqlite3.connect(out / "elevra.db") as conn:
        return [
            conn.execute(f"select count(*) from {t}").fetchone()[0]
            for t in ("elevra_elections", "elevra_candidates", "elevra_election_links")
        ]


def upload_with_a_refused_insert(
    out: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str, list[str]]:
    """The sample uploaded while the database refuses the first batch's insert, once: the run
    id, that batch's key and every batch key."""
    keys = [b.key for b in group_rows(read_rows(SAMPLE).rows, AppConfig().max_candidates_per_batch)]
    broken = keys[0]
    real_insert = pipeline.insert_batch

    def insert_batch(*args: Any) -> Any:  # the database refuses one batch, the first time
        if args[2].key == broken:
            raise InsertError("simulated: the database refused the batch")
        return real_insert(*args)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "insert_batch", insert_batch)
        code, first, _ = cli(capsys, "run", str(SAMPLE), "--out", str(out), "--json", "--quiet")
    assert first is not None and code == 1
    assert (first["status"], first["batches_need_reupload"]) == ("completed_with_failures", 1)
    return str(first["run_id"]), broken, keys


def test_retry_reruns_a_failed_batch_and_sends_a_new_workbook(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "upload"
    run_id, broken, keys = upload_with_a_refused_insert(out, capsys, monkeypatch)
    code = main(["status", run_id, "--out", str(out)])
    listing = capsys.readouterr().out  # the listing is the answer: on stdout
    assert code == 0 and broken in listing and "insert refused" in listing

    code, again, err = cli(capsys, "retry", run_id, broken, "--out", str(out), "--json")
    assert code == 0, err
    assert again is not None and again["status"] == "completed"
    assert again["batches_completed"] == again["batches"] == len(keys)

    # only the failed stage ran again: analyze and structure of that batch were kept
    with sqlite3.connect(out / "elevra.db") as conn:
        ran = conn.execute(
            "select stage, count(*) from lbq_attempts where item_key = ? group by stage", (broken,)
        ).fetchall()
    assert dict(ran) == {"analyze": 1, "structure": 1, "insert": 2}

    sent = emails(out)
    finals = [e for e in sent if e["attachments"]]
    assert [f["idempotency_key"] for f in finals] == [
        f"{run_id}/run_finished/",
        f"{run_id}/run_finished/@2",
    ]
    assert finals[0]["subject"].startswith("Upload completed with 1 batch(es) to re-upload")
    assert finals[1]["subject"].startswith("Upload completed –")
    assert "needs re-upload" in outcomes(finals[0]["attachments"][0])
    assert "needs re-upload" not in outcomes(finals[1]["attachments"][0])
    # round 2 reports the stage that ran again, not the ones that did not
    stage_keys = {
        e["idempotency_key"].removeprefix(f"{run_id}/stage_complete/")
        for e in sent
        if "/stage_complete/" in e["idempotency_key"]
    }
    assert stage_keys == {"analyze", "structure", "insert", "insert@2"}

    # the election tables hold exactly what a clean upload of the same file creates
    clean = tmp_path / "clean"
    code, _, _ = cli(capsys, "run", str(SAMPLE), "--out", str(clean), "--json", "--quiet")
    assert code == 0
    assert table_counts(out) == table_counts(clean)


def test_skip_then_dispatch_finishes_the_upload_and_retry_brings_the_batch_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with open_app(AppConfig.from_env({}), tmp_path, None, simulate=False) as app:
        run, _, batches = app.submit(SAMPLE)
        keys = [i.key for i in app.store.items(run.id)]
    target, other = keys[0], keys[1]
    where = ("--out", str(tmp_path))

    code, _, err = cli(capsys, "skip", run.id, target, "--reason", "wrong county", *where)
    assert code == 0 and "marked for re-upload (skipped: wrong county)" in err
    code, _, err = cli(capsys, "skip", run.id, target, "--reason", "again", *where)
    assert code == 2 and err.startswith("error:") and "needs_reupload" in err
    code, _, err = cli(capsys, "retry", run.id, "no such batch", *where)
    assert code == 2 and "error:" in err and "'no such batch'" in err
    code, _, err = cli(capsys, "retry", "no-such-upload", target, *where)
    assert code == 2 and "error: no run 'no-such-upload'" in err

    assert cli(capsys, "dispatch", *where, "--quiet")[0] == 0
    code, summaries, _ = cli(capsys, "status", run.id, *where, "--json")
    assert summaries is not None
    (status,) = summaries
    assert (status["status"], status["batches_need_reupload"]) == ("completed_with_failures", 1)
    failed = [e for e in emails(tmp_path) if e["subject"].startswith("Batch needs re-upload")]
    assert len(failed) == 1 and "Reason: skipped: wrong county" in failed[0]["text"]

    code, _, err = cli(capsys, "retry", run.id, other, *where)
    assert code == 2 and "is completed" in err
    code, requeued, _ = cli(capsys, "retry", run.id, target, *where, "--no-dispatch", "--json")
    assert code == 0 and requeued is not None and requeued["status"] == "running"
    assert cli(capsys, "dispatch", *where, "--quiet")[0] == 0
    code, summaries, _ = cli(capsys, "status", run.id, *where, "--json")
    assert summaries is not None
    (status,) = summaries
    assert (status["status"], status["batches_completed"]) == ("completed", batches)
    finals = [e for e in emails(tmp_path) if e["attachments"]]
    assert len(finals) == 2
    assert "needs re-upload" not in outcomes(finals[1]["attachments"][0])


def test_retry_exits_1_while_the_upload_still_has_failed_batches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its exit code judged the retried batch alone, so a script saw 0 for an upload that still
    needed re-uploads (new user's trial); it now says what `run` says of the upload."""
    out = tmp_path / "upload"
    keys = [b.key for b in group_rows(read_rows(SAMPLE).rows, AppConfig().max_candidates_per_batch)]
    real_insert = pipeline.insert_batch

    def insert_batch(*args: Any) -> Any:  # the database refuses two batches, the first time
        if args[2].key in keys[:2]:
            raise InsertError("simulated: the database refused the batch")
        return real_insert(*args)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "insert_batch", insert_batch)
        code, first, _ = cli(capsys, "run", str(SAMPLE), "--out", str(out), "--json", "--quiet")
    assert first is not None and code == 1 and first["batches_need_reupload"] == 2
    run_id = str(first["run_id"])
    code, again, err = cli(capsys, "retry", run_id, keys[0], "--out", str(out), "--json")
    assert again is not None and again["batches_need_reupload"] == 1
    assert code == 1 and "the upload ended completed_with_failures" in err
    code, again, err = cli(capsys, "retry", run_id, keys[1], "--out", str(out), "--json")
    assert again is not None and again["status"] == "completed" and code == 0, err


def test_retry_from_an_earlier_stage_runs_it_and_the_later_ones_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "upload"
    run_id, broken, _ = upload_with_a_refused_insert(out, capsys, monkeypatch)
    code, _, err = cli(capsys, "retry", run_id, broken, "--from", "strucure", "--out", str(out))
    assert code == 2 and "no item stage 'strucure'" in err and "analyze, structure, insert" in err

    code, again, err = cli(
        capsys, "retry", run_id, broken, "--from", "structure", "--out", str(out), "--json"
    )
    assert code == 0, err
    assert again is not None and again["status"] == "completed"
    with sqlite3.connect(out / "elevra.db") as conn:
        ran = conn.execute(
            "select stage, count(*) from lbq_attempts where item_key = ? group by stage", (broken,)
        ).fetchall()
    assert dict(ran) == {"analyze": 1, "structure": 2, "insert": 2}


def test_status_of_an_empty_database_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "app.db"
    open_store(db).close()  # the queue, no upload yet
    assert main(["status", "--db", str(db)]) == 0
    assert "no uploads in sqlite:///" in capsys.readouterr().out


def test_dispatch_on_a_path_without_uploads_says_so_and_sets_nothing_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped --out in a cron line made an empty database there and dispatched nothing,
    silently, every minute (new user's trial)."""
    typo = tmp_path / "typo"
    assert main(["dispatch", "--out", str(typo), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "holds no uploads yet (no queue tables there): nothing to dispatch" in err
    assert json.loads(out)["claimed"] == 0
    assert not typo.exists()


@pytest.mark.postgres
@pytest.mark.parametrize(
    "command", [["status"], ["skip", "r", "b", "--reason", "x"], ["email", "1", "--resend"]]
)
def test_commands_on_existing_uploads_refuse_a_database_without_them(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], pg_url: str
) -> None:
    # a mistyped path, or the server's maintenance database: nothing may be set up in it
    typo = tmp_path / "typo" / "elevra.db"
    assert main([*command, "--db", str(typo)]) == 2
    assert "holds no uploads" in capsys.readouterr().err
    assert not typo.parent.exists()
    assert main([*command, "--db", pg_url]) == 2
    engine = create_engine(pg_url)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("value", "hidden"), [("no", False), ("0", False), ("true", True), ("", True)]
)
def test_elevra_hidden_reads_the_usual_yes_and_no(value: str, hidden: bool) -> None:
    assert AppConfig.from_env({"ELEVRA_HIDDEN": value}).hidden is hidden


def test_a_setting_that_is_neither_yes_nor_no_is_refused() -> None:
    with pytest.raises(ConfigError, match="ELEVRA_HIDDEN must be 1/true/yes/on or 0/false/no/off"):
        AppConfig.from_env({"ELEVRA_HIDDEN": "sometimes"})


def test_a_concurrency_of_zero_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["dispatch", "--out", str(tmp_path), "--concurrency", "0"])
    assert code == 2 and "--concurrency must be at least 1" in capsys.readouterr().err


def test_a_batch_skipped_as_its_insert_starts_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the admin's skip lands after the insert job was claimed, before its transaction: the
    # insert is fenced by the job's lease, so the election tables agree with the workbook
    out = tmp_path / "upload"
    real = pipeline.ElevraStages.insert
    skipped: list[str] = []

    async def skipped_on_arrival(self: Any, ctx: Any) -> Any:
        if not skipped:
            skipped.append(ctx.item.key)
            with open_app(AppConfig(), out, None, simulate=False) as admin:
                admin.skip(ctx.run.id, ctx.item.key, "taken away mid-insert")
        return await real(self, ctx)

    monkeypatch.setattr(pipeline.ElevraStages, "insert", skipped_on_arrival)
    with open_app(AppConfig(), out, None, simulate=True) as app:
        run, _, _ = app.submit(SAMPLE)
        app.dispatch(run_id=run.id)
        summary = app.summary(run.id)
    assert summary["batches_need_reupload"] == 1 and summary["status"] == "completed_with_failures"
    # what the workbook reports inserted is exactly what the database holds
    assert (summary["elections"], summary["candidates"]) == (
        summary["db_elections"],
        summary["db_candidates"],
    )
    with sqlite3.connect(out / "elevra.db") as conn:
        (error,) = conn.execute(
            "select error from lbq_items where key = ?", (skipped[0],)
        ).fetchone()
    assert error == "skipped: taken away mid-insert"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ELEVRA_ANALYZE_MODELS": ","}, "ELEVRA_ANALYZE_MODELS"),
        ({"ELEVRA_LEASE_S": "-3"}, "ELEVRA_LEASE_S"),
        ({"ELEVRA_LEASE_S": "nan"}, "ELEVRA_LEASE_S"),
        ({"ELEVRA_LEASE_S": "1m"}, "ELEVRA_LEASE_S"),
        ({"GEMINI_TIMEOUT_MS": "0"}, "GEMINI_TIMEOUT_MS"),
    ],
)
def test_a_bad_setting_is_named_with_its_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        AppConfig.from_env(env)


def test_a_lease_is_seconds_like_the_librarys() -> None:
    assert AppConfig.from_env({"ELEVRA_LEASE_S": "1.5"}).lease_s == 1.5  # was "an integer"


def test_dispatch_progress_says_it_waits_for_other_workers_leases(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import time

    from examples.elevra_upload.cli import _Progress
    from llm_batch_queue import events

    _Progress(quiet=False).on_event(events.WaitingForLeases(3, time.time() + 42))
    err = capsys.readouterr().err
    assert err.startswith("  waiting: 3 jobs running under other workers' leases")
    assert "(in 42 s)" in err or "(in 41 s)" in err
    _Progress(quiet=True).on_event(events.WaitingForLeases(3, time.time() + 42))
    assert capsys.readouterr().err == ""


def test_workers_can_share_a_simulator_started_with_the_apps_responder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README pointed ELEVRA_GEMINI_BASE_URL at "a shared simulator", but the only one that
    could be started on its own answered lorem ipsum, so most batches failed (new user's
    trial). `--responder` serves the app's replies over the real SDK and HTTP."""
    import subprocess
    import sys

    models = ["gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite"]
    process = subprocess.Popen(
        [sys.executable, "-m", "llm_batch_queue.simulator", "--port", "0",
         "--responder", "examples.elevra_upload.simulate:reply",
         *[arg for m in models for arg in ("--model", m)]],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    try:
        assert process.stdout is not None
        url = process.stdout.readline().split()[-1]
        monkeypatch.setenv("ELEVRA_GEMINI_BASE_URL", url)
        out = tmp_path / "upload"
        code, summary, err = cli(capsys, "run", str(SAMPLE), "--out", str(out), "--json")
        assert code == 0, err
        assert summary is not None and summary["status"] == "completed"
        assert "offline" not in err  # the app started no simulator of its own
    finally:
        process.terminate()
        stats, _ = process.communicate(timeout=10)
    served = json.loads(stats.strip().splitlines()[-1])
    answered = sum(s["requests_by_status"].get("200", 0) for s in served.values())
    assert answered >= 2 * summary["batches"]  # analyze and structure of each batch, here


def test_the_simulator_cli_refuses_a_responder_it_cannot_load(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from llm_batch_queue.simulator.__main__ import main as simulator_main

    with pytest.raises(SystemExit):
        simulator_main(["--responder", "examples.elevra_upload.simulate:nope"])
    assert "examples.elevra_upload.simulate has no 'nope'" in capsys.readouterr().err


def test_run_names_the_rejected_rows_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said "1 rejected" and nothing of which or why (new user's trial)."""
    lines = SAMPLE.read_text().splitlines()[:3]
    named = '"Hollis L. Fairleigh","HOLLIS","LINDEN","FAIRLEIGH"'
    nameless = lines[1].replace(named, '"","","",""')
    upload = tmp_path / "upload.csv"
    upload.write_text("\n".join([*lines, nameless]) + "\n")
    code, summary, err = cli(capsys, "run", str(upload), "--out", str(tmp_path / "o"), "--json")
    assert code == 0 and summary is not None, err
    assert "2 rows (utf-8), 1 rejected" in err
    assert "  rejected: row 3: missing candidate name" in err


def test_a_listing_into_a_closed_pipe_ends_quietly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status … | head` printed "error: [Errno 32] Broken pipe" and exited 2 (new user's
    trial): the reader has what it wanted."""
    import os
    import subprocess
    import sys

    out = tmp_path / "o"
    assert cli(capsys, "run", str(SAMPLE), "--out", str(out), "--quiet")[0] == 0
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        done = subprocess.run(
            [sys.executable, "-m", "examples.elevra_upload", "status", "--out", str(out)],
            stdout=write, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1],
        )  # fmt: skip
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (0, "")
