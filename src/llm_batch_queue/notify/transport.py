"""The Transport seam: deliver one rendered message. The dry-run log is the default."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Protocol

import anyio

from llm_batch_queue.notify.message import Message


class Transport(Protocol):
    @property
    def idempotent(self) -> bool:
        """True if sending the same message twice (same idempotency_key) delivers it once:
        the outbox then re-sends a row whose sender died mid-send instead of parking it in
        doubt. Only a provider that dedupes by key (Resend) may say so."""
        ...

    async def send(self, message: Message) -> str:
        """Deliver `message`; return the provider's message id. Raise on failure, preferably
        a DeliveryError saying whether a retry can help and whether the message may have left."""
        ...


class DryRunTransport:
    """Appends each message as one JSON line (attachments base64-encoded) instead of sending."""

    idempotent = False  # a second append is a second line

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    async def send(self, message: Message) -> str:
        at = time.time()
        record = {
            "at": at,
            "to": list(message.to),
            "cc": list(message.cc),
            "bcc": list(message.bcc),
            "subject": message.subject,
            "text": message.text,
            "html": message.html,
            "idempotency_key": message.idempotency_key,
            "attachments": [
                {
                    "filename": a.filename,
                    "mime_type": a.mime_type,
                    "size": len(a.content),
                    "content_base64": base64.b64encode(a.content).decode("ascii"),
                }
                for a in message.attachments
            ],
        }
        line = json.dumps(record, ensure_ascii=False) + "\n"
        await anyio.to_thread.run_sync(self._append, line)
        return f"dryrun-{message.idempotency_key or int(at * 1000)}"

    def _append(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)


class MemoryTransport:
    """Keeps sent messages in a list: the in-memory fake for tests."""

    def __init__(self, *, idempotent: bool = False) -> None:
        self.sent: list[Message] = []
        self.idempotent = idempotent  # pretend to dedupe (tests of the outbox's two paths)

    async def send(self, message: Message) -> str:
        self.sent.append(message)
        return f"memory-{len(self.sent)}"
