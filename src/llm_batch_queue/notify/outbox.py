"""Delivers outbox rows after the transaction that wrote them has committed, each at most once.

A row is claimed (committed as `sending`) before the transport is called and marked after it
answers. The gap between the two is where a crash, a hang or a lost database leaves a message
whose fate is unknown; the store turns such a row, once its hold has passed, into `in_doubt`
unless the transport dedupes a second send by the row's key (see Store.claim_notifications).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import anyio

from llm_batch_queue.clock import Clock, SystemClock
from llm_batch_queue.errors import ConfigError
from llm_batch_queue.jobs import Notification
from llm_batch_queue.notify.errors import DeliveryError
from llm_batch_queue.notify.message import Message
from llm_batch_queue.notify.transport import Transport
from llm_batch_queue.store.base import Store

Compose = Callable[[Notification], Awaitable[Message | None]]
T = TypeVar("T")


class OutboxDelivery:
    """Renders each due notification with `compose` and sends it through `transport`.

    A failed send is retried with exponential backoff up to `max_attempts`, then marked failed
    (it stays visible in the store). A permanent `DeliveryError` is marked failed at once, and a
    transient one's `retry_after_s` delays the retry if it is longer than the backoff. A failure
    after the message may have left (`DeliveryError.maybe_sent`) is retried only through an
    idempotent transport; otherwise the row is marked in doubt. `compose` returning None means
    "nothing to send". A message without an idempotency key gets the row's `dedupe_key`, so a
    retry carries the same key (Resend's Idempotency-Key, SMTP's Message-ID).

    `hold_s` is how long a claimed row is left to its sender: it must outlast one send (with
    SMTP, a few times the transport's timeout), or a slow send is taken for a dead one.
    """

    def __init__(
        self,
        store: Store,
        transport: Transport,
        compose: Compose,
        *,
        clock: Clock | None = None,
        max_attempts: int = 5,
        base_delay_s: float = 30.0,
        hold_s: float = 300.0,
        batch: int = 20,
        mark_retry_s: float = 30.0,
    ) -> None:
        if max_attempts < 1 or base_delay_s < 0 or hold_s <= 0 or batch < 1:
            raise ConfigError(
                "OutboxDelivery: max_attempts and batch must be at least 1, hold_s positive"
            )
        self.store = store
        self.transport = transport
        # a transport written before the attribute existed gets the safe answer: not idempotent
        self.idempotent: bool = getattr(transport, "idempotent", False)
        self.compose = compose
        self.clock = clock or SystemClock()
        self.max_attempts = max_attempts
        self.base_delay_s = base_delay_s
        self.hold_s = hold_s
        self.batch = batch
        self.mark_retry_s = mark_retry_s

    async def drain(self) -> int:
        """Send every row that is due now; return how many were sent."""
        sent = 0
        while True:
            # claimed, not just read: two dispatchers sharing a store must not both send a row
            notes = await self._db(
                self.store.claim_notifications,
                self.clock.now(),
                self.batch,
                self.hold_s,
                idempotent=self.idempotent,
            )
            for note in notes:
                sent += await self._deliver(note)
            if len(notes) < self.batch:
                return sent

    async def _deliver(self, note: Notification) -> int:
        try:
            message = await self.compose(note)
        except Exception as exc:  # a template or lookup error: nothing left, so retrying is safe
            await self._failed(note, exc)
            return 0
        if message is None:
            await self._mark(note.id, sent=True)
            return 0
        if message.idempotency_key is None:
            message = replace(message, idempotency_key=note.dedupe_key)
        try:
            provider_id = await self.transport.send(message)
        except Exception as exc:
            if isinstance(exc, DeliveryError) and exc.maybe_sent and not self.idempotent:
                await self._mark(note.id, sent=False, error=_describe(exc), in_doubt=True)
            else:
                await self._failed(note, exc)
            return 0
        # Sent. If this mark never lands (the process dies, the database stays away) the row
        # stays `sending` and is found in doubt after its hold: not sent twice either way.
        await self._mark(note.id, sent=True, provider_id=provider_id)
        return 1

    async def _failed(self, note: Notification, exc: Exception) -> None:
        now = self.clock.now()
        retry_at = self._retry_at(note.attempts, exc, now)
        await self._mark(note.id, sent=False, error=_describe(exc), retry_at=retry_at)

    async def _mark(self, notification_id: int, **outcome: Any) -> None:
        """Store.mark_notification, tried again for a while if the store is away: losing the
        mark of a delivered message costs an admin's look at an in-doubt row."""
        deadline = anyio.current_time() + self.mark_retry_s
        delay = 0.05
        while True:
            try:
                await self._db(
                    self.store.mark_notification,
                    notification_id,
                    now=self.clock.now(),
                    **outcome,
                )
                return
            except KeyError:
                raise
            except Exception:
                if anyio.current_time() + delay > deadline:
                    raise
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _db(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # store calls block (a database round trip): keep them off the event loop
        return await anyio.to_thread.run_sync(functools.partial(call, *args, **kwargs))

    def _retry_at(self, attempts: int, exc: Exception, now: float) -> float | None:
        """When to try again, or None to give up (the row is then marked failed)."""
        delivery = exc if isinstance(exc, DeliveryError) else None
        if delivery is not None and delivery.permanent:
            return None  # the same message would be refused again, however often it is retried
        if attempts + 1 >= self.max_attempts:
            return None
        delay = self.base_delay_s * 2.0**attempts
        if delivery is not None and delivery.retry_after_s is not None:
            delay = max(delay, delivery.retry_after_s)
        return now + delay


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"
