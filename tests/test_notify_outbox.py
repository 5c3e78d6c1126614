"""OutboxDelivery and transport errors: permanent failures stop at once, transient ones retry."""

from __future__ import annotations

import pytest

from llm_batch_queue.clock import FakeClock
from llm_batch_queue.jobs import Notification, Scope, StageSpec
from llm_batch_queue.notify import DeliveryError, MemoryTransport, Message, OutboxDelivery
from llm_batch_queue.store import MemoryStore

pytestmark = pytest.mark.anyio


class FailingTransport:
    """Raises the scripted errors in turn, then delivers like MemoryTransport."""

    def __init__(self, *errors: Exception, idempotent: bool = False) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.delivered = MemoryTransport()
        self.idempotent = idempotent

    async def send(self, message: Message) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return await self.delivered.send(message)


async def compose(note: Notification) -> Message:
    return Message(("ops@example.org",), f"{note.kind} {note.key}", "body")


def queued_run(store: MemoryStore, clock: FakeClock) -> str:
    stages = {"only": StageSpec("only", Scope.RUN)}
    run = store.create_run(
        pipeline="p",
        name="r",
        stages=stages,
        items=[],
        meta={},
        now=clock.now(),
        notify={"run_queued"},
    )
    return run.id


def setup(
    transport: FailingTransport, max_attempts: int = 5
) -> tuple[MemoryStore, FakeClock, OutboxDelivery, str]:
    store, clock = MemoryStore(), FakeClock()
    run_id = queued_run(store, clock)
    outbox = OutboxDelivery(
        store, transport, compose, clock=clock, max_attempts=max_attempts, base_delay_s=30.0
    )
    return store, clock, outbox, run_id


async def test_a_permanent_failure_is_marked_failed_after_one_attempt() -> None:
    transport = FailingTransport(DeliveryError("550 5.1.1 no such user", permanent=True, code=550))
    store, clock, outbox, run_id = setup(transport)
    assert await outbox.drain() == 0
    [note] = store.notifications(run_id)
    assert (note.status, note.attempts) == ("failed", 1)
    assert note.error == "DeliveryError: 550 5.1.1 no such user (permanent)"
    clock.advance(24 * 3600)
    assert await outbox.drain() == 0
    assert transport.calls == 1  # never offered again


async def test_a_transient_failure_is_retried_after_the_backoff() -> None:
    transport = FailingTransport(DeliveryError("connection refused", permanent=False))
    store, clock, outbox, run_id = setup(transport)
    assert await outbox.drain() == 0
    [note] = store.notifications(run_id)
    assert (note.status, note.attempts) == ("pending", 1)
    assert note.next_attempt_at == clock.now() + 30.0
    clock.advance(29.0)
    assert await outbox.drain() == 0 and transport.calls == 1  # not due yet
    clock.advance(1.0)
    assert await outbox.drain() == 1
    [note] = store.notifications(run_id)
    assert (note.status, note.attempts, note.error) == ("sent", 2, None)
    assert [m.subject for m in transport.delivered.sent] == ["run_queued "]


async def test_a_providers_retry_after_wins_over_a_shorter_backoff() -> None:
    transport = FailingTransport(DeliveryError("429", permanent=False, retry_after_s=120.0))
    store, clock, outbox, run_id = setup(transport)
    await outbox.drain()
    [note] = store.notifications(run_id)
    assert note.next_attempt_at == clock.now() + 120.0


async def test_transient_failures_give_up_after_max_attempts() -> None:
    transport = FailingTransport(*[DeliveryError("timeout", permanent=False)] * 3)
    store, clock, outbox, run_id = setup(transport, max_attempts=3)
    for _ in range(3):
        await outbox.drain()
        clock.advance(3600)
    [note] = store.notifications(run_id)
    assert (note.status, note.attempts, transport.calls) == ("failed", 3, 3)


async def test_other_exceptions_are_still_retried() -> None:
    # a template bug or an unclassified transport error may be fixed by the time of the retry
    transport = FailingTransport(RuntimeError("boom"))
    store, _, outbox, run_id = setup(transport)
    await outbox.drain()
    [note] = store.notifications(run_id)
    assert (note.status, note.error) == ("pending", "RuntimeError: boom")


async def test_a_message_gets_the_rows_dedupe_key_unless_it_has_one() -> None:
    transport = FailingTransport()
    store, _, outbox, run_id = setup(transport)
    assert await outbox.drain() == 1
    [sent] = transport.delivered.sent
    assert sent.idempotency_key == f"{run_id}/run_queued/"
    [note] = store.notifications(run_id)
    assert (note.status, note.provider_id) == ("sent", "memory-1")


async def test_a_send_that_may_have_left_is_in_doubt_unless_the_transport_dedupes() -> None:
    lost = DeliveryError("connection lost after DATA", permanent=False, maybe_sent=True)
    transport = FailingTransport(lost)
    store, clock, outbox, run_id = setup(transport)
    assert await outbox.drain() == 0
    [note] = store.notifications(run_id)
    assert (note.status, note.attempts) == ("in_doubt", 1)
    assert note.error is not None and "may have been sent" in note.error
    clock.advance(24 * 3600)
    assert await outbox.drain() == 0 and transport.calls == 1  # never offered again

    transport = FailingTransport(lost, idempotent=True)
    store, clock, outbox, run_id = setup(transport)
    await outbox.drain()
    assert store.notifications(run_id)[0].status == "pending"  # the provider drops a copy
    clock.advance(30.0)
    assert await outbox.drain() == 1


class Crash(BaseException):
    """The process dying right after the transport returned, before the mark."""


class CrashAfterSend:
    def __init__(self, inner: MemoryTransport) -> None:
        self.inner = inner
        self.idempotent = inner.idempotent

    async def send(self, message: Message) -> str:
        await self.inner.send(message)
        raise Crash


@pytest.mark.parametrize("idempotent", [False, True])
async def test_a_crash_between_send_and_mark_never_sends_twice(idempotent: bool) -> None:
    store, clock = MemoryStore(), FakeClock()
    run_id = queued_run(store, clock)
    wire = MemoryTransport(idempotent=idempotent)
    with pytest.raises(Crash):
        await OutboxDelivery(store, CrashAfterSend(wire), compose, clock=clock, hold_s=60).drain()
    assert store.notifications(run_id)[0].status == "sending"
    restarted = OutboxDelivery(store, wire, compose, clock=clock, hold_s=60)
    assert await restarted.drain() == 0  # still held: the sender may only be slow
    clock.advance(60.0)
    [note] = store.notifications(run_id)
    if idempotent:  # sent again under the same key, which the provider turns into one e-mail
        assert await restarted.drain() == 1
        first, second = wire.sent
        assert first.idempotency_key == second.idempotency_key == note.dedupe_key
        assert store.notifications(run_id)[0].status == "sent"
    else:
        assert await restarted.drain() == 0
        assert len(wire.sent) == 1
        assert store.notifications(run_id)[0].status == "in_doubt"


def test_notify_exports_exactly_what_all_lists() -> None:
    import llm_batch_queue.notify as notify

    exported = {n for n in dir(notify) if not n.startswith("_")}
    modules = {n for n in exported if type(getattr(notify, n)).__name__ == "module"}
    assert exported - modules == set(notify.__all__)
