"""No e-mail twice: concurrent senders on one store, and a sender killed between send and mark.

Real parts throughout: an SMTP server (aiosmtpd) and a Resend-like HTTP endpoint on 127.0.0.1,
SQLite files and PostgreSQL databases, and a sender process that dies by SIGKILL.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from conftest import StoreFactory
from mailservers import FakeResend, Recorder

from llm_batch_queue.clock import FakeClock
from llm_batch_queue.jobs import Notification, Scope, StageSpec
from llm_batch_queue.notify import (
    Message,
    OutboxDelivery,
    ResendSettings,
    ResendTransport,
    SMTPSettings,
    SMTPTransport,
    Transport,
)
from llm_batch_queue.store import Store
from llm_batch_queue.store.sql import open_store

SENDER = "Elevra <uploads@elevra.test>"
CRASHER = Path(__file__).with_name("_outbox_crash.py")


async def compose(note: Notification) -> Message:
    return Message(("ops@example.org",), f"{note.kind} {note.run_id}", "body")


def queue_runs(store: Store, n: int) -> list[str]:
    """`n` runs, each leaving one run_queued row in the outbox."""
    stages = {"only": StageSpec("only", Scope.RUN)}
    return [
        store.create_run(
            pipeline="p",
            name=f"r{i}",
            stages=stages,
            items=[],
            meta={},
            now=time.time(),
            notify={"run_queued"},
        ).id
        for i in range(n)
    ]


def smtp(port: int) -> SMTPTransport:
    return SMTPTransport(
        SMTPSettings(host="127.0.0.1", port=port, sender=SENDER, starttls=False, timeout_s=5.0)
    )


class MeetFirst:
    """Holds each sender's first send until both senders are in the middle of a drain, each
    holding the rows it claimed: if two claims could take the same row, both now send it."""

    def __init__(self, inner: Transport, barrier: threading.Barrier) -> None:
        self.inner = inner
        self.barrier = barrier
        self.idempotent = inner.idempotent
        self.met = False
        self.sent = 0

    async def send(self, message: Message) -> str:
        if not self.met:
            self.met = True
            await anyio.to_thread.run_sync(self.barrier.wait, 10.0)
        self.sent += 1
        return await self.inner.send(message)


def test_two_senders_draining_one_store_send_each_message_once(
    store_factory: StoreFactory, serve: Callable[..., int]
) -> None:
    handler = Recorder()
    port = serve(handler)
    run_ids = queue_runs(store_factory(), 24)
    barrier = threading.Barrier(2)
    senders = [MeetFirst(smtp(port), barrier) for _ in range(2)]
    errors: list[BaseException] = []

    def drain(transport: MeetFirst) -> None:
        # a store handle of its own per sender (for SQL an engine and pool, as a process has)
        outbox = OutboxDelivery(store_factory(), transport, compose, batch=3)
        try:
            anyio.run(outbox.drain)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(t,)) for t in senders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert all(s.sent > 0 for s in senders)  # both really sent, at the same time
    subjects = Counter(str(r.email["Subject"]) for r in handler.received)
    assert subjects == Counter(f"run_queued {r}" for r in run_ids)  # each once, none lost
    assert len({r.email["Message-ID"] for r in handler.received}) == len(run_ids)
    store = store_factory()
    notes = [n for r in run_ids for n in store.notifications(r)]
    assert {n.status for n in notes} == {"sent"}
    assert {n.provider_id for n in notes} == {r.email["Message-ID"] for r in handler.received}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    return url


def kill_a_sender_after_it_sent(url: str, kind: str, where: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(CRASHER), url, kind, where], capture_output=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def test_smtp_a_sender_killed_between_send_and_mark_is_not_sent_again(
    shared_url: str, serve: Callable[..., int]
) -> None:
    handler = Recorder()
    port = serve(handler)
    store = open_store(shared_url)
    try:
        [run_id] = queue_runs(store, 1)
        kill_a_sender_after_it_sent(shared_url, "smtp", str(port))
        assert len(handler.received) == 1
        [note] = store.notifications(run_id)
        assert note.status == "sending"  # the mark never came

        clock = FakeClock(time.time())
        restarted = OutboxDelivery(store, smtp(port), compose, clock=clock, hold_s=60.0)
        assert anyio.run(restarted.drain) == 0  # held: the sender might only be slow
        clock.advance(61.0)
        assert anyio.run(restarted.drain) == 0
        assert len(handler.received) == 1  # exactly one copy, ever
        [note] = store.notifications(run_id)
        assert (note.status, note.attempts) == ("in_doubt", 1)
        clock.advance(3600.0)
        assert anyio.run(restarted.drain) == 0 and len(handler.received) == 1

        # an admin who found it in the mailbox records it; one who did not would resend it
        store.resolve_notification(note.id, resend=False, now=clock.now())
        assert store.notifications(run_id)[0].status == "sent"
    finally:
        store.close()


def test_resend_a_sender_killed_between_send_and_mark_is_resent_under_the_same_key(
    shared_url: str, resend: FakeResend
) -> None:
    store = open_store(shared_url)
    try:
        [run_id] = queue_runs(store, 1)
        kill_a_sender_after_it_sent(shared_url, "resend", resend.url)
        assert len(resend.requests) == len(resend.delivered) == 1
        clock = FakeClock(time.time() + 61.0)  # past the dead sender's hold
        transport = ResendTransport(
            ResendSettings(api_key="re_test", sender=SENDER, base_url=resend.url)
        )
        outbox = OutboxDelivery(store, transport, compose, clock=clock, hold_s=60.0)
        assert anyio.run(outbox.drain) == 1
        first, again = resend.requests
        assert first.headers["Idempotency-Key"] == again.headers["Idempotency-Key"]
        assert first.body == again.body
        assert len(resend.delivered) == 1  # Resend answered the repeat with the first e-mail
        [note] = store.notifications(run_id)
        assert (note.status, note.provider_id) == ("sent", "email-1")
        assert first.headers["Idempotency-Key"] == note.dedupe_key
    finally:
        store.close()
