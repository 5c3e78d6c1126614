"""The composition root: one place that wires store, database, model, outbox and pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError, ProgrammingError

from examples.elevra_upload import store as app_store
from examples.elevra_upload.batches import group_rows
from examples.elevra_upload.config import AppConfig
from examples.elevra_upload.ingest import IngestError, IngestResult, read_rows
from examples.elevra_upload.notifications import ElevraMail
from examples.elevra_upload.outcomes import rejected_to_meta
from examples.elevra_upload.pipeline import PIPELINE_NAME, build_pipeline
from examples.elevra_upload.simulate import start_simulator
from llm_batch_queue import events
from llm_batch_queue.adapters.gemini import GeminiAdapter
from llm_batch_queue.clock import SystemClock
from llm_batch_queue.dispatch import DispatcherSettings, DispatchStats
from llm_batch_queue.jobs import Item, NewItem, Notification, Run
from llm_batch_queue.notify import (
    DryRunTransport,
    LinkLargeAttachments,
    LocalDirectoryStore,
    OutboxDelivery,
    ResendSettings,
    ResendTransport,
    SMTPTransport,
    Transport,
)
from llm_batch_queue.pipeline import Pipeline
from llm_batch_queue.simulator import Simulator
from llm_batch_queue.store.base import Purge, Store
from llm_batch_queue.store.sql import open_store
from llm_batch_queue.store.sql.engine import WRITE, make_engine
from llm_batch_queue.worker import WorkerApp, serve, stoppable


@dataclass
class ElevraApp:
    config: AppConfig
    out: Path
    store: Store
    engine: Engine
    pipeline: Pipeline
    simulator: Simulator | None
    clock: SystemClock

    def submit(self, path: Path) -> tuple[Run, IngestResult, int]:
        """Read, batch and enqueue a spreadsheet; nothing is enqueued if the file is unusable."""
        if path.is_dir():
            raise IngestError(f"{path} is a directory, not a spreadsheet")
        if not path.is_file():
            raise IngestError(f"{path}: no such file")
        ingest = read_rows(path)
        batches = group_rows(ingest.rows, self.config.max_candidates_per_batch)
        run = self.store.create_run(
            pipeline=PIPELINE_NAME,
            name=path.name,
            stages=self.pipeline.specs,
            items=[NewItem(b.key, b.to_payload()) for b in batches],
            meta={
                "rows": len(ingest.rows) + len(ingest.rejected),
                "source": str(path),
                "uploader_email": self.config.uploader_email,
                "encoding": ingest.encoding,
                "rejected": rejected_to_meta(ingest.rejected),
            },
            now=self.clock.now(),
            notify=self.pipeline.notify,
        )
        return run, ingest, len(batches)

    def retry(self, run_id: str, batch_key: str, from_stage: str | None = None) -> Item:
        """Queue a batch that needs re-upload again, from the stage that failed (the stages it
        passed are kept), or from `from_stage` on. The upload gets a new workbook and final
        e-mail once it settles. ValueError unless the batch needs re-upload or for an unknown
        stage; KeyError for an unknown upload or batch."""
        return self.store.retry_item(run_id, batch_key, self.clock.now(), from_stage)

    def skip(self, run_id: str, batch_key: str, reason: str) -> Item:
        """Give up on a queued or running batch: it is marked for re-upload with `reason`, and
        the upload finishes without it. ValueError for a completed or already failed batch."""
        return self.store.skip_item(run_id, batch_key, reason, self.clock.now())

    def transport(self) -> Transport:
        """The configured e-mail transport, linking attachments too large to send."""
        c = self.config
        inner: Transport
        if c.email_transport == "smtp":
            inner = SMTPTransport(c.smtp_settings())
        elif c.email_transport == "resend":
            assert c.resend_api_key is not None
            inner = ResendTransport(
                ResendSettings(c.resend_api_key, c.email_from, base_url=c.resend_base_url)
            )
        else:
            inner = DryRunTransport(self.out / "emails.jsonl")
        files = LocalDirectoryStore(c.attach_dir or self.out / "attachments", c.attach_base_url)
        return LinkLargeAttachments(inner, files, max_bytes=c.attach_max_bytes)

    def resolve_email(self, notification_id: int, *, resend: bool) -> Notification:
        """An admin's answer to an e-mail in doubt (or failed): send it (again) with the next
        dispatch, or record that it arrived."""
        return self.store.resolve_notification(notification_id, resend=resend, now=self.clock.now())

    def cleanup(self, older_than_s: float) -> Purge:
        """Clear the rows and model outputs of uploads finished longer ago than `older_than_s`
        whose final e-mail was sent (the others are reported as waiting)."""
        return self.store.purge_finished_runs(older_than_s, self.clock.now())

    def worker_app(self, on_event: events.EventSink | None = None) -> WorkerApp:
        """The dispatcher's parts: Gemini (or the simulator), limits, the e-mail outbox."""
        base_url = self.simulator.url if self.simulator else self.config.gemini_base_url
        adapter = GeminiAdapter(
            api_key=str(self.config.api_key or "simulated-key"),
            base_url=base_url,
            timeout_ms=self.config.timeout_ms,
        )
        outbox = OutboxDelivery(
            self.store,
            self.transport(),
            ElevraMail(self.store, self.config, self.clock),
            clock=self.clock,
            hold_s=self.config.email_hold_s,
        )
        return WorkerApp(
            self.pipeline,
            adapter,
            limits=self.config.limits,
            settings=DispatcherSettings(
                concurrency=self.config.concurrency,
                lease_s=self.config.lease_s,
                heartbeat_s=self.config.lease_s / 4,
            ),
            on_event=on_event,
            outbox=outbox,
            close=adapter.aclose,
        )

    def dispatch(
        self,
        *,
        on_event: events.EventSink | None = None,
        time_budget_s: float | None = None,
        max_jobs: int | None = None,
        until_idle: bool = True,
        run_id: str | None = None,
    ) -> DispatchStats:
        """Drive the runnable jobs in the store (this run's and any left by earlier processes).

        With `run_id`, return once that run has finished rather than waiting for others.
        """
        parts = self.worker_app(on_event)
        dispatcher = parts.dispatcher(self.store)

        async def drive() -> bool:
            # one event loop for the calls and the client's close: its connections belong to it
            try:
                return await stoppable(work)  # Ctrl-C or a supervisor's SIGTERM: True
            finally:
                assert parts.close is not None
                await parts.close()

        async def work() -> None:
            if until_idle and time_budget_s is None and max_jobs is None:
                await dispatcher.run_until_idle(run_id=run_id)
            else:
                await dispatcher.run_once(time_budget_s=time_budget_s, max_jobs=max_jobs)

        if anyio.run(drive):
            raise KeyboardInterrupt
        return dispatcher.stats

    def serve(
        self, on_event: events.EventSink | None = None, grace_s: float = 30.0
    ) -> DispatchStats:
        """Run as a worker until SIGTERM/SIGINT (see llm_batch_queue.worker.serve)."""
        from llm_batch_queue.cli import wakeups_for

        parts = self.worker_app(on_event)
        return anyio.run(
            lambda: serve(self.store, parts, wakeups=wakeups_for(self.store), grace_s=grace_s)
        )

    def summary(self, run_id: str, elapsed_s: float | None = None) -> dict[str, Any]:
        run = self.store.get_run(run_id)
        counts = self.store.counts(run_id)
        attempts = self.store.attempts(run_id)
        jobs = self.store.jobs(run_id)
        workbook = next(
            (j.output["path"] for j in jobs if j.stage == "workbook" and j.output), None
        )
        items = self.store.items(run_id)
        notes = self.store.notifications(run_id)
        inserted = [i.outputs["insert"] for i in items if i.outputs.get("insert")]
        with self.engine.connect() as conn:
            db_elections = conn.scalar(select(func.count()).select_from(app_store.elections))
            db_candidates = conn.scalar(select(func.count()).select_from(app_store.candidates))
        return {
            "run_id": run_id,
            "file": run.name,
            "status": run.status.value,
            "rows": run.meta.get("rows"),
            "rows_rejected": len(run.meta.get("rejected", ())),
            "batches": counts.items_total,
            "batches_completed": counts.items_by_status.get("completed", 0),
            "batches_need_reupload": counts.items_by_status.get("needs_reupload", 0),
            # this upload's elections and distinct candidates, inserted or already present
            "elections": len({r["election_id"] for r in inserted}),
            "candidates": len({c["slug"] for r in inserted for c in r["candidates"]}),
            # what the app's tables hold in all (a re-upload leaves these unchanged)
            "db_elections": db_elections,
            "db_candidates": db_candidates,
            "jobs": len(jobs),
            "attempts": len(attempts),
            "fallbacks": sum(1 for a in attempts if a.result.is_fallback),
            "provider_429": sum(1 for a in attempts if a.result.error_kind == "rate_limited"),
            "input_tokens": sum(a.result.input_tokens for a in attempts),
            "output_tokens": sum(a.result.output_tokens for a in attempts),
            "cost_usd": self.store.run_summary(run_id).total_cost_usd(self.config.prices),
            "workbook": workbook,
            "emails": sum(1 for n in notes if n.status == "sent"),
            # not delivered (yet): the next dispatch retries pending ones; failed ones gave up;
            # in_doubt ones wait for `email ID --resend` or `--mark-sent`
            "emails_undelivered": [
                {"id": n.id, "kind": n.kind, "key": n.key, "status": n.status, "error": n.error}
                for n in notes
                if n.status != "sent"
            ],
            "purged_at": run.purged_at,
            "elapsed_s": None if elapsed_s is None else round(elapsed_s, 2),
        }


@contextmanager
def open_app(
    config: AppConfig,
    out: Path,
    db_url: str | None,
    *,
    simulate: bool,
    store: Store | None = None,
) -> Iterator[ElevraApp]:
    """The app on `db_url` (default: a SQLite file in `out`); with `store`, on that store's
    database, leaving the store open when done."""
    out.mkdir(parents=True, exist_ok=True)
    url = db_url or f"sqlite:///{out / 'elevra.db'}"
    owns_store = store is None
    store = store or open_store(url)
    # the app's tables share the database; on SQLite its inserts must take the write lock up
    # front (BEGIN IMMEDIATE) like the queue's own transactions, or they can deadlock with them
    engine = make_engine(url, execution_options={WRITE: True})
    simulator: Simulator | None = None
    try:
        try:
            app_store.create_tables(engine)
        except (IntegrityError, ProgrammingError):
            # another process created them at the same moment (PostgreSQL): they exist now
            app_store.create_tables(engine)
        pipeline = build_pipeline(config, engine, out, store)
        if simulate and not config.gemini_base_url:
            simulator = start_simulator(config.limits, pipeline.model_names)
        yield ElevraApp(config, out, store, engine, pipeline, simulator, SystemClock())
    finally:
        if simulator is not None:
            simulator.close()
        if owns_store:
            store.close()
        engine.dispose()
