"""A rendered e-mail, ready for any Transport."""

from __future__ import annotations

from dataclasses import dataclass

XLSX_MIME = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content: bytes
    mime_type: str = "application/octet-stream"


def base64_size(attachments: tuple[Attachment, ...]) -> int:
    """Bytes the attachments take base64-encoded: what Resend counts against its limit."""
    return sum(4 * -(-len(a.content) // 3) for a in attachments)


@dataclass(frozen=True, slots=True)
class Message:
    to: tuple[str, ...]
    subject: str
    text: str
    html: str | None = None
    attachments: tuple[Attachment, ...] = ()
    idempotency_key: str | None = None  # stable per outbox row, for transports that dedupe
    cc: tuple[str, ...] = ()  # e.g. a team address copied on every e-mail, visible to all
    bcc: tuple[str, ...] = ()  # envelope only: never written into the headers
