"""One exception tree for everything the queue raises or classifies.

Adapters translate provider/SDK errors into these at the seam, so the retry policy and the
dispatcher never look at third-party exception types.
"""

from __future__ import annotations

from enum import StrEnum


class LLMBatchQueueError(Exception):
    """Root of every error raised by llm_batch_queue."""


class ConfigError(LLMBatchQueueError, ValueError):
    """A pipeline, limit or setting is invalid; raised when it is built, not when it runs."""


class LeaseLost(LLMBatchQueueError):
    """The job's lease expired and another dispatcher owns it now; nothing was changed."""


class RequestTooLarge(LLMBatchQueueError):
    """A single request needs more than a whole window's budget: it can never be admitted."""


class ErrorKind(StrEnum):
    """How a failed call is treated by the retry policy (stored on attempts as `error_kind`)."""

    RATE_LIMITED = "rate_limited"
    TRANSIENT = "transient"
    INVALID_OUTPUT = "invalid_output"
    PERMANENT = "permanent"
    MODEL_NOT_FOUND = "model_not_found"
    HANDLER = "handler"


class QuotaScope(StrEnum):
    """Which provider quota a 429 reported, read from QuotaFailure's quota id."""

    MINUTE = "minute"
    DAY = "day"
    UNKNOWN = "unknown"


class CallError(LLMBatchQueueError):
    """A classified failure of one model call or stage handler."""

    kind: ErrorKind = ErrorKind.TRANSIENT
    # seconds from generate() being called to the request leaving, if the adapter saw it leave
    # (see ModelResponse.send_delay_s); adapters set it on the errors they raise
    send_delay_s: float | None = None

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        # the message is stored with the attempt; PostgreSQL text cannot hold NUL (U+0000) and
        # UTF-8 no lone surrogate (U+D800-DFFF), and a provider's or handler's message may
        # carry either (a reply cut inside an emoji): written as escapes instead
        message = message.replace("\x00", "\\x00")
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class RateLimited(CallError):
    """The provider answered 429; `retry_after_s` comes from RetryInfo when it was sent."""

    kind = ErrorKind.RATE_LIMITED

    def __init__(
        self,
        message: str,
        *,
        scope: QuotaScope = QuotaScope.UNKNOWN,
        retry_after_s: float | None = None,
        quota_id: str | None = None,
        status_code: int | None = 429,
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.scope = scope
        self.retry_after_s = retry_after_s
        self.quota_id = quota_id


class TransientError(CallError):
    """5xx, timeouts, dropped connections: worth retrying after a backoff."""

    kind = ErrorKind.TRANSIENT


class InvalidOutput(CallError):
    """The model answered, but with empty, unparseable or schema-invalid output."""

    kind = ErrorKind.INVALID_OUTPUT


class PermanentError(CallError):
    """400/401/403 and other errors that the same request will hit again."""

    kind = ErrorKind.PERMANENT


class TooLarge(PermanentError):
    """The request is larger than the model's limits could ever admit (RequestTooLarge): the
    next model of the chain may take it; on the last one the job fails, naming the sizes."""


class ModelNotFound(CallError):
    """404 for the model: skip to the next model in the chain."""

    kind = ErrorKind.MODEL_NOT_FOUND
