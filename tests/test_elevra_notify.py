"""The app's e-mail end to end: real transports chosen by configuration, the final e-mail with the
workbook (attached, or linked above the size limit), e-mails in doubt, retention cleanup."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import openpyxl
import pytest
from mailservers import FakeResend, Recorder

from examples.elevra_upload import pipeline
from examples.elevra_upload.batches import group_rows
from examples.elevra_upload.cli import main
from examples.elevra_upload.config import AppConfig
from examples.elevra_upload.ingest import read_rows
from examples.elevra_upload.store import InsertError
from llm_batch_queue.notify import XLSX_MIME

SAMPLE = Path(__file__).parents[1] / "examples" / "elevra_upload" / "samples" / "sample_nc.csv"
SHEETS = ["Results", "Summary", "Needs re-upload"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "ELEVRA_LIMITS", "ELEVRA_ENV"):
        monkeypatch.delenv(name, raising=False)
    for name in list(__import__("os").environ):
        if name.startswith(("ELEVRA_EMAIL", "ELEVRA_SMTP", "ELEVRA_ATTACH", "RESEND_")):
            monkeypatch.delenv(name)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    """Exit code, the --json line (if printed) and stderr."""
    code = main(list(args))
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else None), captured.err


def use_smtp(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    monkeypatch.setenv("ELEVRA_EMAIL", "smtp")
    monkeypatch.setenv("ELEVRA_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("ELEVRA_SMTP_PORT", str(port))
    monkeypatch.setenv("ELEVRA_SMTP_SECURITY", "none")
    monkeypatch.setenv("ELEVRA_EMAIL_FROM", "Elevra <uploads@elevra.test>")


def attachment(email: EmailMessage) -> tuple[str, bytes]:
    [part] = list(email.iter_attachments())
    assert part.get_content_type() == XLSX_MIME
    content = part.get_content()
    assert isinstance(content, bytes)
    return str(part.get_filename()), content


def test_the_final_email_goes_through_a_real_smtp_server_with_the_workbook(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    serve: Callable[..., int],
) -> None:
    handler = Recorder()
    use_smtp(monkeypatch, serve(handler))
    code, summary, err = cli(capsys, "run", str(SAMPLE), "--out", str(tmp_path), "--json")
    assert code == 0, err
    assert summary["emails"] == len(handler.received) == 5
    assert not (tmp_path / "emails.jsonl").exists()  # not a dry run
    subjects = [str(r.email["Subject"]) for r in handler.received]
    assert subjects[0].startswith("Upload queued") and subjects[-1].startswith("Upload completed")
    final = handler.received[-1]
    assert final.mail_from == "uploads@elevra.test"
    assert final.rcpt_tos == ["admin@example.org", "team@example.org"]
    assert (final.email["To"], final.email["Cc"]) == ("admin@example.org", "team@example.org")
    name, content = attachment(final.email)
    assert name == Path(summary["workbook"]).name
    assert content == Path(summary["workbook"]).read_bytes()
    book = openpyxl.load_workbook(io.BytesIO(content))
    assert book.sheetnames == SHEETS
    assert book["Results"].max_row - 1 == summary["rows"]
    # each e-mail's Message-ID is derived from its outbox row: a copy would be recognisable
    ids = [str(r.email["Message-ID"]) for r in handler.received]
    assert len(set(ids)) == 5 and all(i.endswith("@elevra.test>") for i in ids)


def test_resend_is_chosen_by_configuration_and_keys_every_email(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    resend: FakeResend,
) -> None:
    monkeypatch.setenv("ELEVRA_EMAIL", "resend")
    monkeypatch.setenv("RESEND_API_KEY", "re_app_key")
    monkeypatch.setenv("ELEVRA_RESEND_BASE_URL", resend.url)
    code, summary, err = cli(capsys, "run", str(SAMPLE), "--out", str(tmp_path), "--json")
    assert code == 0, err
    assert len(resend.delivered) == len(resend.requests) == 5
    assert {r.headers["Authorization"] for r in resend.requests} == {"Bearer re_app_key"}
    keys = [r.headers["Idempotency-Key"] for r in resend.requests]
    run_id = summary["run_id"]
    assert keys[0] == f"{run_id}/run_queued/" and keys[-1] == f"{run_id}/run_finished/"
    [workbook] = resend.requests[-1].body["attachments"]
    book = openpyxl.load_workbook(io.BytesIO(base64.b64decode(workbook["content"])))
    assert book.sheetnames == SHEETS


def test_a_workbook_over_the_size_limit_is_stored_and_linked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ELEVRA_ATTACH_MAX_BYTES", "1000")  # the sample's workbook is larger
    monkeypatch.setenv("ELEVRA_ATTACH_BASE_URL", "https://files.elevra.test/uploads")
    code, summary, err = cli(capsys, "run", str(SAMPLE), "--out", str(tmp_path), "--json")
    assert code == 0, err
    final = json.loads((tmp_path / "emails.jsonl").read_text().splitlines()[-1])
    assert final["attachments"] == []
    name = Path(summary["workbook"]).name
    [stored] = list((tmp_path / "attachments").glob(f"*/{name}"))
    assert stored.read_bytes() == Path(summary["workbook"]).read_bytes()
    link = f"https://files.elevra.test/uploads/{stored.parent.name}/{name}"
    assert link in final["text"] and f'href="{link}"' in final["html"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ELEVRA_EMAIL": "smtp"}, "ELEVRA_EMAIL=smtp needs ELEVRA_SMTP_HOST"),
        ({"ELEVRA_EMAIL": "resend"}, "needs RESEND_API_KEY"),
        ({"ELEVRA_EMAIL": "carrier-pigeon"}, "ELEVRA_EMAIL must be one of dryrun, smtp, resend"),
        ({"ELEVRA_ENV": "production"}, "ELEVRA_ENV=production: set ELEVRA_EMAIL"),
        (
            {"ELEVRA_EMAIL": "smtp", "ELEVRA_SMTP_HOST": "mx", "ELEVRA_SMTP_SECURITY": "tls"},
            "ELEVRA_SMTP_SECURITY must be one of starttls, ssl, none",
        ),
        (
            {
                "ELEVRA_EMAIL": "smtp",
                "ELEVRA_SMTP_HOST": "mx",
                "ELEVRA_SMTP_SECURITY": "none",
                "ELEVRA_SMTP_USER": "u",
                "ELEVRA_SMTP_PASSWORD": "p",
            },
            "credentials over an unencrypted connection",
        ),
        ({"ELEVRA_EMAIL_FROM": "nobody"}, "ELEVRA_EMAIL_FROM has no address"),
        ({"ELEVRA_PRICES": '{"m": {"input": 1}}'}, "ELEVRA_PRICES"),
        ({"ELEVRA_TEMPLATES": "/no/such/dir"}, "ELEVRA_TEMPLATES"),
    ],
)
def test_bad_email_settings_are_refused_before_anything_is_queued(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    message: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = cli(capsys, "run", str(SAMPLE), "--out", str(tmp_path))
    assert code == 2 and message in err
    assert not (tmp_path / "elevra.db").exists()


def test_secrets_stay_out_of_the_configs_repr() -> None:
    config = AppConfig.from_env(
        {"ELEVRA_EMAIL": "resend", "RESEND_API_KEY": "re_secret", "ELEVRA_SMTP_PASSWORD": "pw1"}
    )
    assert "re_secret" not in repr(config) and "pw1" not in repr(config)


def test_emails_in_doubt_are_shown_resolved_by_an_admin_and_hold_back_the_cleanup(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    serve: Callable[..., int],
) -> None:
    # the server takes each message and hangs up before answering: delivered, but unconfirmed
    handler = Recorder(drop_after_data=True)
    use_smtp(monkeypatch, serve(handler))
    out = str(tmp_path)
    code, summary, _ = cli(capsys, "run", str(SAMPLE), "--out", out, "--json", "--quiet")
    assert code == 1  # finished, but e-mails are not confirmed
    run_id = summary["run_id"]
    assert len(handler.received) == 5
    undelivered = summary["emails_undelivered"]
    assert {n["status"] for n in undelivered} == {"in_doubt"} and len(undelivered) == 5
    code, _, err = cli(capsys, "dispatch", "--out", out, "--quiet")
    assert code == 0 and len(handler.received) == 5  # never sent a second time on its own

    main(["status", run_id, "--out", out])
    listing = capsys.readouterr().out
    final = next(n for n in undelivered if n["kind"] == "run_finished")
    assert f"e-mail {final['id']} in_doubt" in listing and "--mark-sent" in listing

    # D-29: nothing is cleared while the final e-mail is not known to have been sent
    code, result, err = cli(capsys, "cleanup", "--older-than", "0", "--out", out, "--json")
    assert code == 0 and result == {"purged": [], "waiting": [run_id]}
    with sqlite3.connect(tmp_path / "elevra.db") as conn:
        kept = conn.execute("select count(*) from lbq_items where payload != 'null'").fetchone()
    assert kept == (summary["batches"],)

    # the admin finds it in the mailbox log and records it; now the cleanup may go ahead
    code, _, err = cli(capsys, "email", str(final["id"]), "--mark-sent", "--out", out)
    assert code == 0, err
    code, _, err = cli(capsys, "email", str(final["id"]), "--resend", "--out", out)
    assert code == 2 and "is sent" in err  # decided already
    code, result, _ = cli(capsys, "cleanup", "--older-than", "30d", "--out", out, "--json")
    assert result == {"purged": [], "waiting": []}  # not 30 days old yet
    code, result, _ = cli(capsys, "cleanup", "--older-than", "0", "--out", out, "--json")
    assert result == {"purged": [run_id], "waiting": []}
    with sqlite3.connect(tmp_path / "elevra.db") as conn:
        left = conn.execute(
            "select count(*) from lbq_items where payload != 'null' or outputs != '{}'"
        ).fetchone()
        outputs = conn.execute("select count(*) from lbq_jobs where output != 'null'").fetchone()
    assert left == outputs == (0,)
    code, status, err = cli(capsys, "status", run_id, "--out", out, "--json")
    assert status[0]["purged_at"] is not None and "cleaned up" in err


def test_a_retried_batch_that_fails_again_is_reported_again_and_listed_for_reupload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = group_rows(read_rows(SAMPLE).rows)[0].key

    def insert_batch(*args: Any) -> Any:
        if args[2].key == broken:
            raise InsertError("simulated: the database refused the batch")
        return real(*args)

    real = pipeline.insert_batch
    monkeypatch.setattr(pipeline, "insert_batch", insert_batch)
    out = str(tmp_path)
    code, first, _ = cli(capsys, "run", str(SAMPLE), "--out", out, "--json", "--quiet")
    assert code == 1
    code, again, _ = cli(capsys, "retry", first["run_id"], broken, "--out", out, "--json")
    assert code == 1 and again["batches_need_reupload"] == 1
    sent = [json.loads(line) for line in (tmp_path / "emails.jsonl").read_text().splitlines()]
    failures = [e for e in sent if e["subject"].startswith("Batch needs re-upload")]
    assert len(failures) == 2  # once per failure, not once per batch (D-26)
    assert "(failure 1)" in failures[0]["text"] and "(failure 2)" in failures[1]["text"]
    final = [e for e in sent if e["attachments"]][-1]
    book = openpyxl.load_workbook(
        io.BytesIO(base64.b64decode(final["attachments"][0]["content_base64"]))
    )
    rows = list(book["Needs re-upload"].iter_rows(values_only=True))
    assert rows[0] == ("Batch key", "Batch", "Rows", "Stage", "Reason", "Failures")
    [(key, label, n, stage, reason, count)] = rows[1:]
    assert (key, stage, count) == (broken, "insert", 2)
    assert n == 3 and "database refused the batch" in str(reason) and label


def test_templates_from_the_users_directory_override_the_apps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = tmp_path / "templates"
    ours.mkdir()
    (ours / "run_queued.subject.j2").write_text("Received {{ run.name }}", encoding="utf-8")
    monkeypatch.setenv("ELEVRA_TEMPLATES", str(ours))
    code, _, err = cli(capsys, "run", str(SAMPLE), "--out", str(tmp_path / "out"), "--quiet")
    assert code == 0, err
    sent = [json.loads(x) for x in (tmp_path / "out" / "emails.jsonl").read_text().splitlines()]
    assert sent[0]["subject"] == "Received sample_nc.csv"
    assert sent[1]["subject"].startswith("Analyze phase complete")  # the app's own
