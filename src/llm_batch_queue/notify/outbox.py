"""Delivers outbox rows after the transaction that wrote them has committed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from llm_batch_queue.clock import Clock, SystemClock
from llm_batch_queue.jobs import Notification
from llm_batch_queue.notify.errors import DeliveryError
from llm_batch_queue.notify.message import Message
from llm_batch_queue.notify.transport import Transport
from llm_batch_queue.store.base import Store

Compose = Callable[[Notification], Awaitable[Message | None]]


class OutboxDelivery:
    """Renders each pending notification with `compose` and sends it through `transport`.

    A failed send is retried with exponential backoff up to `max_attempts`, then marked failed
    (it stays visible in the store). A permanent `DeliveryError` is marked failed at once, and a
    transient one's `retry_after_s` delays the retry if it is longer than the backoff.
    `compose` returning None means "nothing to send".
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
    ) -> None:
        self.store = store
        self.transport = transport
        self.compose = compose
        self.clock = clock or SystemClock()
        self.max_attempts = max_attempts
        self.base_delay_s = base_delay_s

    async def drain(self) -> int:
        sent = 0
        # claimed, not just read: two dispatchers sharing a store must not both send a row
        for note in self.store.claim_notifications(self.clock.now()):
            try:
                message = await self.compose(note)
                if message is not None:
                    await self.transport.send(message)
            except Exception as exc:  # the transport's or the template's: keep the row, retry
                now = self.clock.now()
                retry_at = self._retry_at(note.attempts, exc, now)
                self.store.mark_notification(
                    note.id,
                    sent=False,
                    now=now,
                    error=f"{type(exc).__name__}: {exc}",
                    retry_at=retry_at,
                )
                continue
            self.store.mark_notification(note.id, sent=True, now=self.clock.now())
            sent += 1
        return sent

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
