"""`python -m examples.elevra_upload run FILE`: ingest, dispatch until done, report."""

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

import anyio
from sqlalchemy import Engine, create_engine, func, select

from examples.elevra_upload import store as app_store
from examples.elevra_upload.batches import group_rows
from examples.elevra_upload.config import AppConfig, parse_limits
from examples.elevra_upload.ingest import IngestError, read_rows
from examples.elevra_upload.notifications import ElevraMail
from examples.elevra_upload.outcomes import rejected_to_meta
from examples.elevra_upload.pipeline import PIPELINE_NAME, build_pipeline
from examples.elevra_upload.simulate import start_simulator
from llm_batch_queue import events
from llm_batch_queue.adapters.gemini import GeminiAdapter
from llm_batch_queue.clock import SystemClock
from llm_batch_queue.dispatch import Dispatcher, DispatcherSettings
from llm_batch_queue.errors import ConfigError
from llm_batch_queue.jobs import NewItem
from llm_batch_queue.notify import DryRunTransport, OutboxDelivery
from llm_batch_queue.store.base import Store
from llm_batch_queue.store.sql import open_store


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.elevra_upload")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="process a candidate spreadsheet (CSV or XLSX)")
    run.add_argument("file", type=Path)
    run.add_argument(
        "--out",
        type=Path,
        default=Path("elevra-out"),
        help="directory for the database, workbook and e-mail log (default elevra-out)",
    )
    run.add_argument("--db", help="database URL (default: sqlite:///OUT/elevra.db)")
    run.add_argument(
        "--simulate",
        action="store_true",
        help="use the offline Gemini simulator (the default without GEMINI_API_KEY)",
    )
    run.add_argument("--limits", help='JSON or a JSON file: {"gemini-2.5-pro": {"rpm": 150}}')
    run.add_argument("--uploader", help="e-mail address of the uploader (gets the e-mails)")
    run.add_argument("--concurrency", type=int, help="model calls in flight at once")
    run.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (IngestError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    config = AppConfig.from_env(os.environ)
    if args.limits:
        config = replace(config, limits={**config.limits, **parse_limits(args.limits)})
    if args.uploader:
        config = replace(config, uploader_email=args.uploader)
    if args.concurrency:
        config = replace(config, concurrency=args.concurrency)
    simulate = args.simulate or not config.api_key
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    db_url = args.db or f"sqlite:///{out / 'elevra.db'}"

    if not args.file.is_file():
        raise IngestError(f"{args.file}: no such file")
    ingest = read_rows(args.file)
    batches = group_rows(ingest.rows, config.max_candidates_per_batch)
    log = _Progress(quiet=args.quiet)
    log.say(
        f"{args.file.name}: {len(ingest.rows)} rows ({ingest.encoding or 'xlsx'}), "
        f"{len(ingest.rejected)} rejected, {len(batches)} batches"
    )
    for issue in ingest.warnings[:10]:
        log.say(f"  warning: {issue}")

    engine = create_engine(db_url)
    app_store.create_tables(engine)
    store = open_store(db_url)
    clock = SystemClock()
    pipeline = build_pipeline(config, engine, out)
    simulator = start_simulator(config.limits, pipeline.model_names) if simulate else None
    if simulator is not None:
        log.say(
            f"offline: simulated Gemini at {simulator.url} (answers derive from the rows; "
            "no research is performed)"
        )
    adapter = GeminiAdapter(
        api_key="simulated-key" if simulator else str(config.api_key),
        base_url=simulator.url if simulator else None,
        timeout_ms=config.timeout_ms,
    )
    try:
        run = store.create_run(
            pipeline=PIPELINE_NAME,
            name=args.file.name,
            stages=pipeline.specs,
            items=[NewItem(b.key, b.to_payload()) for b in batches],
            meta={
                "rows": len(ingest.rows),
                "source": str(args.file),
                "uploader_email": config.uploader_email,
                "encoding": ingest.encoding,
                "rejected": rejected_to_meta(ingest.rejected),
            },
            now=clock.now(),
            notify=pipeline.notify,
        )
        outbox = OutboxDelivery(
            store,
            DryRunTransport(out / "emails.jsonl"),
            ElevraMail(store, config, clock),
            clock=clock,
        )
        dispatcher = Dispatcher(
            store,
            pipeline,
            adapter,
            limits=config.limits,
            clock=clock,
            settings=DispatcherSettings(concurrency=config.concurrency),
            on_event=log.on_event,
            outbox=outbox,
        )
        started = time.monotonic()

        async def dispatch() -> None:
            # one event loop for the calls and the client's close: its connections belong to it
            try:
                await dispatcher.run_until_idle()
            finally:
                await adapter.aclose()

        anyio.run(dispatch)
        elapsed = time.monotonic() - started
    finally:
        if simulator is not None:
            simulator.close()
    summary = _summary(store, run.id, engine, len(ingest.rows), len(batches), elapsed)
    store.close()
    engine.dispose()
    log.say(_human(summary))
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["batches_completed"] == summary["batches"] else 1


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
        now = time.monotonic()
        if now - self.last >= 1.0:
            self.last = now
            stages = " · ".join(f"{k} {v}" for k, v in self.done.items())
            self.say(f"  done: {stages} | failed attempts {self.failed} | waits {self.deferred}")


def _summary(
    store: Store, run_id: str, engine: Engine, rows: int, batches: int, elapsed: float
) -> dict[str, Any]:
    run = store.get_run(run_id)
    counts = store.counts(run_id)
    attempts = store.attempts(run_id)
    jobs = store.jobs(run_id)
    workbook = next((j.output["path"] for j in jobs if j.stage == "workbook" and j.output), None)
    with engine.connect() as conn:
        elections = conn.scalar(select(func.count()).select_from(app_store.elections))
        candidates = conn.scalar(select(func.count()).select_from(app_store.candidates))
    return {
        "run_id": run_id,
        "status": run.status.value,
        "rows": rows,
        "batches": batches,
        "batches_completed": counts.items_by_status.get("completed", 0),
        "batches_need_reupload": counts.items_by_status.get("needs_reupload", 0),
        "elections": elections,
        "candidates": candidates,
        "jobs": len(jobs),
        "attempts": len(attempts),
        "fallbacks": sum(1 for a in attempts if a.result.is_fallback),
        "provider_429": sum(1 for a in attempts if a.result.error_kind == "rate_limited"),
        "input_tokens": sum(a.result.input_tokens for a in attempts),
        "output_tokens": sum(a.result.output_tokens for a in attempts),
        "workbook": workbook,
        "emails": sum(1 for n in store.notifications(run_id) if n.status == "sent"),
        "elapsed_s": round(elapsed, 2),
    }


def _human(s: dict[str, Any]) -> str:
    return (
        f"run {s['run_id']} {s['status']} in {s['elapsed_s']} s: "
        f"{s['batches_completed']}/{s['batches']} batches completed, "
        f"{s['batches_need_reupload']} need re-upload; {s['elections']} elections and "
        f"{s['candidates']} candidates in the database; {s['attempts']} model/stage attempts, "
        f"{s['fallbacks']} on a fallback model, {s['provider_429']} provider 429s; "
        f"workbook {s['workbook']}; {s['emails']} e-mails logged"
    )
