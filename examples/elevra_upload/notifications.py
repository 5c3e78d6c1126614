"""Turns the queue's outbox rows into the app's e-mails (templates in ./emails)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio

from examples.elevra_upload.config import AppConfig
from examples.elevra_upload.outcomes import batch_label
from llm_batch_queue.clock import Clock
from llm_batch_queue.jobs import Notification
from llm_batch_queue.notify import XLSX_MIME, Attachment, Message, TemplateRenderer
from llm_batch_queue.store.base import Store

TEMPLATES = Path(__file__).with_name("emails")


class ElevraMail:
    """The `compose` callback of OutboxDelivery for this app."""

    def __init__(
        self,
        store: Store,
        config: AppConfig,
        clock: Clock,
        template_dirs: tuple[Path, ...] = (),
    ) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        dirs = (*template_dirs, *((config.templates_dir,) if config.templates_dir else ()))
        self.renderer = TemplateRenderer((*dirs, TEMPLATES), tz=config.display_tz)

    async def __call__(self, note: Notification) -> Message | None:
        run = self.store.get_run(note.run_id)
        counts = self.store.counts(run.id).items_by_status
        context: dict[str, Any] = {
            "run": {"id": run.id, "name": run.name},
            "meta": run.meta,
            "now": self.clock.now(),
            "at": note.created_at,  # when it happened, not when the e-mail got out
            "counts": {
                "total": sum(counts.values()),
                "completed": counts.get("completed", 0),
                "running": counts.get("running", 0),
                "queued": counts.get("queued", 0),
                "needs_reupload": counts.get("needs_reupload", 0),
            },
        }
        attachments: tuple[Attachment, ...] = ()
        if note.kind == "stage_complete":
            jobs = note.payload["jobs"]
            context["stage"] = {
                "name": note.payload["stage"],
                "title": str(note.payload["stage"]).capitalize(),
                "succeeded": jobs.get("succeeded", 0),
                "failed": jobs.get("failed", 0),
                "cancelled": jobs.get("cancelled", 0),
            }
        elif note.kind == "item_failed":
            item = next(i for i in self.store.items(run.id) if i.key == note.payload["item_key"])
            context["item"] = {
                "label": batch_label(item),
                "error": note.payload.get("error") or "unknown",
                "failure": note.payload.get("failure", 1),
            }
        elif note.kind == "run_finished":
            context["final"], attachments = await self._final(run.id, note.payload["status"])
        rendered = self.renderer.render(note.kind, context)
        uploader, team = str(run.meta.get("uploader_email", "")), self.config.team_email
        to = tuple(a for a in (uploader,) if "@" in a) or tuple(a for a in (team,) if "@" in a)
        # the team is copied (Cc) on the uploader's e-mails, or addressed when there is none
        cc = tuple(a for a in (team,) if "@" in a and a not in to)
        if not to:  # failing keeps the row visible and reported instead of "sent" to nobody
            raise ValueError("no recipient: set ELEVRA_UPLOADER_EMAIL or ELEVRA_TEAM_EMAIL")
        return Message(
            to=to,
            cc=cc,
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            attachments=attachments,
            idempotency_key=f"{run.id}/{note.kind}/{note.key}",
        )

    async def _final(
        self, run_id: str, status: str
    ) -> tuple[dict[str, Any], tuple[Attachment, ...]]:
        items = self.store.items(run_id)
        elections: set[int] = set()
        candidates: set[str] = set()
        for item in items:
            inserted = item.outputs.get("insert")
            if inserted:
                elections.add(inserted["election_id"])
                candidates.update(c["slug"] for c in inserted["candidates"])
        workbook = next(
            (j.output for j in self.store.jobs(run_id) if j.stage == "workbook" and j.output), None
        )
        attachments: tuple[Attachment, ...] = ()
        if workbook:
            path = Path(workbook["path"])
            content = await anyio.Path(path).read_bytes()
            attachments = (Attachment(path.name, content, XLSX_MIME),)
        summary = self.store.run_summary(run_id)
        cost = summary.total_cost_usd(self.config.prices)
        final = {
            "status": status,
            "elections": len(elections),
            "candidates": len(candidates),
            "fallbacks": summary.fallbacks,
            "failed_attempts": summary.failed_attempts,
            "input_tokens": summary.input_tokens,
            "output_tokens": summary.output_tokens,
            "cost": "n/a" if cost is None else f"${cost:,.2f}",
            "stages": [
                {"name": st.name, "started": st.first_started_at, "finished": st.last_finished_at}
                for st in summary.stages
                if st.first_started_at is not None and st.name != "workbook"
            ],
            "hidden": self.config.hidden,
            "workbook": Path(workbook["path"]).name if workbook else None,
            "failed": [
                {"label": batch_label(i), "error": i.error or "unknown"}
                for i in items
                if i.status.value == "needs_reupload"
            ],
        }
        return final, attachments
