"""`python -m examples.elevra_upload run FILE`: ingest, dispatch until done, report.

Also `dispatch` (drive whatever is queued: after a crash, or from cron), `status`, the admin
actions on one batch: `retry` (run a batch that needs re-upload again) and `skip` (mark a queued
or running batch for re-upload), `email` (resend an e-mail in doubt, or record that it arrived)
and `cleanup` (clear old uploads' rows and model outputs once their final e-mail was sent).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy.exc import ArgumentError, OperationalError

from examples.elevra_upload.app import ElevraApp, open_app
from examples.elevra_upload.config import AppConfig
from examples.elevra_upload.ingest import IngestError
from llm_batch_queue import events
from llm_batch_queue.cli import wait_for_database
from llm_batch_queue.dispatch import DispatchStats
from llm_batch_queue.errors import ConfigError
from llm_batch_queue.jobs import ItemStatus
from llm_batch_queue.limits_config import load_limits
from llm_batch_queue.store.sql import holds_queue


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.elevra_upload")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="process a candidate spreadsheet (CSV or XLSX)")
    run.add_argument("file", type=Path)
    dispatch = sub.add_parser(
        "dispatch", help="drive the queued work in the database (resume after a crash, or cron)"
    )
    dispatch.add_argument("--time-budget", type=float, help="start no job after this many seconds")
    dispatch.add_argument("--max-jobs", type=int, help="start at most this many jobs")
    worker = sub.add_parser(
        "worker",
        help="run as a worker until SIGTERM/SIGINT (many may share a PostgreSQL database)",
        description="Drive whatever is queued, waiting for more: on PostgreSQL new uploads wake "
        "it at once (LISTEN/NOTIFY). The first signal stops claiming and lets the jobs in "
        "flight finish (for up to --grace seconds); a second hands them back at once.",
    )
    worker.add_argument("--grace", type=float, default=30.0, help="seconds to finish in-flight")
    status = sub.add_parser("status", help="show the uploads in the database")
    status.add_argument("run_id", nargs="?", help="one upload's summary (default: all)")
    retry = sub.add_parser(
        "retry",
        help="run a batch that needs re-upload again, from the stage that failed",
        description="Re-queue a batch that failed or was skipped: the stages it passed are kept, "
        "the rest run again, then the upload gets a new workbook and final e-mail.",
    )
    skip = sub.add_parser(
        "skip",
        help="mark a queued or running batch for re-upload now",
        description="Give up on a batch that is still queued or running: its jobs are cancelled "
        "and the upload finishes without it. The e-mails and, if it was the last batch, the "
        "workbook follow with the next `dispatch`.",
    )
    for p in (retry, skip):
        p.add_argument("run_id", help="the upload (see `status`)")
        p.add_argument("batch_key", help="the batch's key (`status RUN_ID` lists them)")
    retry.add_argument(
        "--no-dispatch",
        action="store_true",
        help="only re-queue the batch (a running or later `dispatch` does the work)",
    )
    retry.add_argument(
        "--from",
        dest="from_stage",
        metavar="STAGE",
        help="also run this stage and every one after it again, e.g. `--from structure` when "
        "insert failed on the structured output (stages: analyze, structure, insert)",
    )
    skip.add_argument("--reason", required=True, help="why: shown in the e-mail and workbook")
    email = sub.add_parser(
        "email",
        help="resend an e-mail that is in doubt or failed, or record that it arrived",
        description="An e-mail whose sender stopped between sending and recording it is in doubt "
        "(SMTP and the dry-run log cannot take back a second copy, so it is not resent on its "
        "own). Look in the mail server's log for it (its Message-ID is stable), then either "
        "resend it or mark it sent. `status RUN_ID` lists the ids.",
    )
    email.add_argument("notification_id", type=int, help="the e-mail's id (`status RUN_ID`)")
    choice = email.add_mutually_exclusive_group(required=True)
    choice.add_argument("--resend", action="store_true", help="send it with the next dispatch")
    choice.add_argument("--mark-sent", action="store_true", help="it arrived: record it as sent")
    cleanup = sub.add_parser(
        "cleanup",
        help="clear the rows and model outputs of uploads finished long enough ago",
        description="Clears the spreadsheet rows and model outputs kept for uploads that "
        "finished more than --older-than ago, once their final e-mail was sent (an upload whose "
        "final e-mail is pending, failed or in doubt keeps everything). Counts, reasons and the "
        "workbook file stay; a cleaned upload can no longer be retried.",
    )
    cleanup.add_argument(
        "--older-than", required=True, type=_duration, help="e.g. 30d, 12h, 90m or seconds"
    )
    for p in (run, dispatch, worker, status, retry, skip, email, cleanup):
        p.add_argument(
            "--out",
            type=Path,
            default=Path("elevra-out"),
            help="directory for the database, workbooks and e-mail log (default elevra-out)",
        )
        p.add_argument(
            "--db", help="database URL, or a SQLite file's path (default: OUT/elevra.db)"
        )
        p.add_argument("--json", action="store_true", help="print JSON as the last line")
    for p in (run, dispatch, worker, retry):
        p.add_argument(
            "--simulate",
            action="store_true",
            help="use the offline Gemini simulator (the default without GEMINI_API_KEY)",
        )
        p.add_argument(
            "--limits",
            help='JSON or a .json/.toml file: {"gemini-2.5-pro": {"rpm": 150}}'
            " (replaces those models' limits)",
        )
        p.add_argument("--concurrency", type=int, help="model calls in flight at once")
    for p in (run, dispatch, worker):
        p.add_argument("--uploader", help="e-mail address of the uploader (gets the e-mails)")
    for p in (run, dispatch, worker, retry, skip):
        p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    try:
        config = _config(args)
        simulate = bool(getattr(args, "simulate", False)) or not config.api_key
        calls_models = args.command in ("run", "dispatch", "worker") or (
            args.command == "retry" and not args.no_dispatch
        )
        if args.command not in ("run", "dispatch", "worker"):
            # these read or change existing uploads: a mistyped --db/--out (or the server's
            # maintenance database) must not get tables set up in it
            where = _database(args)
            if not holds_queue(where):
                print(f"error: {where} holds no uploads (no queue tables there)", file=sys.stderr)
                return 2
        elif args.command == "dispatch" and not holds_queue(where := _database(args)):
            # nothing to do there, and most often a mistyped --out/--db in a cron line: said,
            # and nothing set up (a worker may wait on an empty database for the first upload)
            print(f"{where} holds no uploads yet (no queue tables there): nothing to dispatch",
                  file=sys.stderr)  # fmt: skip
            if args.json:
                print(json.dumps({k: getattr(DispatchStats(), k) for k in DispatchStats.__slots__}))
            return 0
        if args.command == "worker":
            wait_for_database(_database(args))  # started while it restarts: wait, not exit
        with open_app(config, args.out, args.db, simulate=simulate and calls_models) as app:
            if args.command == "run":
                return _run(app, args)
            if args.command == "dispatch":
                return _dispatch(app, args)
            if args.command == "worker":
                return _worker(app, args)
            if args.command == "retry":
                return _retry(app, args)
            if args.command == "skip":
                return _skip(app, args)
            if args.command == "email":
                return _email(app, args)
            if args.command == "cleanup":
                return _cleanup(app, args)
            return _status(app, args)
    except BrokenPipeError:
        # `status … | head`: the reader has what it wanted; stay quiet, also at exit's flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (IngestError, ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: jobs in flight were handed back; finish with "
            f"`python -m examples.elevra_upload dispatch --out {args.out}"
            + (f" --db {args.db}`" if args.db else "`"),
            file=sys.stderr,
        )
        return 130
    except KeyError as exc:  # an unknown upload or batch id
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    except (ArgumentError, OperationalError) as exc:
        print(f"error: cannot use the database {_database(args)}: {exc}", file=sys.stderr)
        return 2


def _database(args: argparse.Namespace) -> str:
    """--db, or the SQLite file in --out that open_app uses without it."""
    return str(args.db or f"sqlite:///{args.out / 'elevra.db'}")


def _config(args: argparse.Namespace) -> AppConfig:
    config = AppConfig.from_env(os.environ)
    if getattr(args, "limits", None):
        config = config.with_limits(load_limits(args.limits), "--limits")
    if getattr(args, "uploader", None):
        config = replace(config, uploader_email=args.uploader)
    if getattr(args, "concurrency", None) is not None:
        if args.concurrency < 1:
            raise ConfigError("--concurrency must be at least 1")
        config = replace(config, concurrency=args.concurrency)
    return config


def _run(app: ElevraApp, args: argparse.Namespace) -> int:
    log = _Progress(quiet=args.quiet)
    started = time.monotonic()
    run, ingest, batches = app.submit(args.file)
    log.say(
        f"{args.file.name}: {len(ingest.rows)} rows ({ingest.encoding or 'xlsx'}), "
        f"{len(ingest.rejected)} rejected, {batches} batches"
    )
    for issue in ingest.warnings[:10]:
        log.say(f"  warning: {issue}")
    for row in ingest.rejected[:10]:  # all of them are in the workbook's Results sheet
        log.say(f"  rejected: row {row.row_number}: {row.reason}")
    if len(ingest.rejected) > 10:
        log.say(f"  rejected: {len(ingest.rejected) - 10} more rows (see the workbook)")
    if app.simulator is not None:
        log.say(
            f"offline: simulated Gemini at {app.simulator.url} (answers derive from the rows; "
            "no research is performed)"
        )
    app.dispatch(on_event=log.on_event, run_id=run.id)
    log.flush()
    summary = app.summary(run.id, time.monotonic() - started)
    log.say(_human(summary))
    if args.json:
        print(json.dumps(summary))
    return _outcome(log, summary)


def _outcome(log: _Progress, summary: dict[str, Any]) -> int:
    """Say what still needs someone; 0 if the upload completed and no e-mail needs an admin."""
    stuck = []  # e-mails that need an admin; pending or sending ones are on their way
    for note in summary["emails_undelivered"]:
        error = f": {note['error']}" if note["error"] else ""
        if note["status"] in ("pending", "sending"):
            log.say(
                f"  e-mail {note['kind']} is {note['status']} (a worker or the next dispatch "
                f"sends it){'; last try' + error if error else ''}"
            )
        else:
            stuck.append(note)
            log.say(f"  e-mail {note['kind']} not delivered ({note['status']}){error}")
    if summary["status"] != "completed":
        log.say(f"  the upload ended {summary['status']}: see `status {summary['run_id']}`")
    return 0 if summary["status"] == "completed" and not stuck else 1


def _dispatch(app: ElevraApp, args: argparse.Namespace) -> int:
    log = _Progress(quiet=args.quiet)
    stats = app.dispatch(
        on_event=log.on_event, time_budget_s=args.time_budget, max_jobs=args.max_jobs
    )
    result = {k: getattr(stats, k) for k in stats.__slots__}
    log.say(f"dispatched: {result}")
    if args.json:
        print(json.dumps(result))
    return 0


def _worker(app: ElevraApp, args: argparse.Namespace) -> int:
    log = _Progress(quiet=args.quiet)
    if app.simulator is not None:
        log.say(f"offline: simulated Gemini at {app.simulator.url}")
    log.say(f"worker {os.getpid()} serving {args.db or args.out / 'elevra.db'}")
    stats = app.serve(on_event=log.on_event, grace_s=args.grace)
    result = {k: getattr(stats, k) for k in stats.__slots__}
    log.say(f"worker stopped: {result}")
    if args.json:
        print(json.dumps(result))
    return 0


def _retry(app: ElevraApp, args: argparse.Namespace) -> int:
    log = _Progress(quiet=args.quiet)
    started = time.monotonic()
    try:
        item = app.retry(args.run_id, args.batch_key, args.from_stage)
    except (KeyError, ValueError) as exc:
        return _refused(exc)
    log.say(f"batch {item.key} re-queued (it failed {item.failures} time(s) so far)")
    if args.no_dispatch:
        log.say("not dispatched: a running `dispatch`, or the next one, does the work")
    else:
        app.dispatch(on_event=log.on_event)
    summary = app.summary(args.run_id, time.monotonic() - started)
    log.say(_human(summary))
    if args.json:
        print(json.dumps(summary))
    # like `run`: what the upload came to (re-queued only, there is nothing to judge yet)
    return 0 if args.no_dispatch else _outcome(log, summary)


def _skip(app: ElevraApp, args: argparse.Namespace) -> int:
    log = _Progress(quiet=args.quiet)
    try:
        item = app.skip(args.run_id, args.batch_key, args.reason)
    except (KeyError, ValueError) as exc:
        return _refused(exc)
    summary = app.summary(args.run_id)
    log.say(
        f"batch {item.key} marked for re-upload ({item.error}); upload {summary['status']}: "
        f"{summary['batches_completed']}/{summary['batches']} batches completed, "
        f"{summary['batches_need_reupload']} need re-upload. Its e-mail (and the workbook, if "
        "this was the last open batch) go out with the next `dispatch`."
    )
    if args.json:
        print(json.dumps(summary))
    return 0


def _email(app: ElevraApp, args: argparse.Namespace) -> int:
    try:
        note = app.resolve_email(args.notification_id, resend=args.resend)
    except (KeyError, ValueError) as exc:
        return _refused(exc)
    what = "queued to be sent with the next `dispatch`" if args.resend else "recorded as sent"
    print(
        f"e-mail {note.id} ({note.kind} {note.key}) of upload {note.run_id} {what}", file=sys.stderr
    )
    if args.json:
        print(json.dumps({"id": note.id, "status": note.status}))
    return 0


def _cleanup(app: ElevraApp, args: argparse.Namespace) -> int:
    done = app.cleanup(args.older_than)
    print(f"cleaned {len(done.purged)} upload(s): {' '.join(done.purged) or '-'}", file=sys.stderr)
    if done.waiting:
        print(
            f"kept {len(done.waiting)} upload(s) whose final e-mail was not sent (see `status "
            f"RUN_ID`): {' '.join(done.waiting)}",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps({"purged": done.purged, "waiting": done.waiting}))
    return 0


def _duration(text: str) -> float:
    """'30d', '12h', '90m', '45s' or plain seconds."""
    units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
    value = text.strip().lower()
    factor = units.get(value[-1:])
    number = value[:-1] if factor is not None else value
    try:
        seconds = float(number) * (factor or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 30d, 12h, 90m)") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"a duration is a finite number >= 0, got {text!r}")
    return seconds


def _refused(exc: KeyError | ValueError) -> int:
    """The store refused the admin action: an unknown upload/batch, or a batch in the wrong
    state. (A KeyError's str() is its repr; print its message.)"""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    print(f"error: {message}", file=sys.stderr)
    return 2


def _status(app: ElevraApp, args: argparse.Namespace) -> int:
    runs = [app.store.get_run(args.run_id)] if args.run_id else app.store.list_runs()
    summaries = [app.summary(r.id) for r in runs]
    # the listing is the answer: stdout, unless --json makes the JSON line the only one there
    out = sys.stderr if args.json else sys.stdout
    if not runs:
        print(f"no uploads in {app.engine.url.render_as_string(hide_password=True)}", file=out)
    for s in summaries:
        print(
            f"{s['run_id']}  {s['status']:<24} {s['file']}: {s['batches_completed']}/"
            f"{s['batches']} batches, {s['batches_need_reupload']} need re-upload",
            file=out,
        )
    if args.run_id:  # the batches an admin may retry or skip, by key
        for item in app.store.items(args.run_id):
            if item.status is not ItemStatus.COMPLETED:
                error = f"  {item.error}" if item.error else ""
                print(f"  {item.status.value:<15} {item.key}{error}", file=out)
    for s in summaries:  # e-mails an admin may have to act on, by id
        for note in s["emails_undelivered"]:
            acts = note["status"] in ("in_doubt", "failed")
            hint = "  -> `email ID --resend` or `--mark-sent`" if acts else ""
            error = f": {note['error']}" if note["error"] else ""
            print(
                f"  e-mail {note['id']} {note['status']:<9} {note['kind']} {note['key']}"
                f"{hint}{error}",
                file=out,
            )
        if s["purged_at"] is not None:
            print(f"  {s['run_id']}: rows and model outputs cleaned up", file=out)
    if args.json:
        print(json.dumps(summaries))
    return 0


class _Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.done: Counter[str] = Counter()
        self.failed = 0
        self.deferred = 0
        self.last = 0.0

    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.CallSucceeded):
            self.done[event.stage] += 1
        elif isinstance(event, events.CallFailed):
            self.failed += 1
        elif isinstance(event, events.Deferred):
            self.deferred += 1
        elif isinstance(event, events.WaitingForLeases):
            self.say(f"  waiting: {event.explain(time.time())}")
        now = time.monotonic()
        if now - self.last >= 1.0:
            self.last = now
            self.flush()

    def flush(self) -> None:
        if self.done or self.failed or self.deferred:
            stages = " · ".join(f"{k} {v}" for k, v in self.done.items()) or "nothing yet"
            self.say(f"  done: {stages} | failed attempts {self.failed} | waits {self.deferred}")


def _human(s: dict[str, Any]) -> str:
    return (
        f"run {s['run_id']} {s['status']} in {s['elapsed_s']} s: "
        f"{s['batches_completed']}/{s['batches']} batches completed, "
        f"{s['batches_need_reupload']} need re-upload; {s['elections']} elections and "
        f"{s['candidates']} candidates (the database holds {s['db_elections']} and "
        f"{s['db_candidates']}); {s['attempts']} model/stage attempts, "
        f"{s['fallbacks']} on a fallback model, {s['provider_429']} provider 429s; "
        + (f"workbook {s['workbook']}; " if s["workbook"] else "no workbook yet; ")
        + f"{s['emails']} e-mails sent"
    )
