"""How a transport reports a failed delivery, so the outbox knows whether retrying can help."""

from __future__ import annotations

from llm_batch_queue.errors import LLMBatchQueueError


class DeliveryError(LLMBatchQueueError):
    """A message was not delivered.

    `permanent` means the same message will fail the same way again (a 5xx reply, rejected
    credentials, a validation error): the outbox marks it failed at once instead of retrying.
    Otherwise (connection refused, a timeout, a 4xx reply, a rate limit) it is retried, no sooner
    than `retry_after_s` when the provider said how long to wait.

    `maybe_sent` means the failure came after the message was handed over (the connection
    dropped before the server's answer to the data): it may have arrived. Unless the transport
    is idempotent the outbox then does not retry but marks the row in doubt.
    """

    def __init__(
        self,
        message: str,
        *,
        permanent: bool,
        code: int | None = None,
        retry_after_s: float | None = None,
        maybe_sent: bool = False,
    ) -> None:
        kind = "permanent" if permanent else "transient"
        super().__init__(f"{message} ({kind}{', may have been sent' if maybe_sent else ''})")
        self.permanent = permanent
        self.code = code  # the SMTP reply code or HTTP status, when there was one
        self.retry_after_s = retry_after_s
        self.maybe_sent = maybe_sent
