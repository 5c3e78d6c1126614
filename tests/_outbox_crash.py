"""A sender that dies (SIGKILL, no cleanup) right after the transport delivered, before the mark.

    python tests/_outbox_crash.py STORE_URL smtp PORT
    python tests/_outbox_crash.py STORE_URL resend BASE_URL

Used by test_notify_exactly_once.py: what the restarted sender does next is the test.
"""

from __future__ import annotations

import os
import signal
import sys

import anyio

from llm_batch_queue.jobs import Notification
from llm_batch_queue.notify import (
    Message,
    OutboxDelivery,
    ResendSettings,
    ResendTransport,
    SMTPSettings,
    SMTPTransport,
    Transport,
)
from llm_batch_queue.store.sql import open_store

SENDER = "Elevra <uploads@elevra.test>"
HOLD_S = 60.0


async def compose(note: Notification) -> Message:
    return Message(("ops@example.org",), f"{note.kind} {note.run_id}", "body")


def transport(kind: str, where: str) -> Transport:
    if kind == "smtp":
        return SMTPTransport(
            SMTPSettings(host="127.0.0.1", port=int(where), sender=SENDER, starttls=False)
        )
    return ResendTransport(ResendSettings(api_key="re_test", sender=SENDER, base_url=where))


class DieAfterSend:
    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.idempotent = inner.idempotent

    async def send(self, message: Message) -> str:
        await self.inner.send(message)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


def main() -> None:
    url, kind, where = sys.argv[1:4]
    store = open_store(url)
    outbox = OutboxDelivery(store, DieAfterSend(transport(kind, where)), compose, hold_s=HOLD_S)
    anyio.run(outbox.drain)


if __name__ == "__main__":
    main()
