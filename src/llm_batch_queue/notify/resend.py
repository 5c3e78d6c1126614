"""Resend's HTTP API (`POST /emails`) over httpx2, the HTTP client google-genai already brings."""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import httpx2

from llm_batch_queue.notify.errors import DeliveryError
from llm_batch_queue.notify.message import Message, base64_size

# "max 40MB per email, after Base64 encoding of the attachments"; read as decimal megabytes, the
# stricter reading, so a message we let through is never one Resend refuses
RESEND_ATTACHMENT_LIMIT_BYTES = 40_000_000
_MAX_IDEMPOTENCY_KEY = 256  # Resend answers 400 invalid_idempotency_key beyond this


@dataclass(frozen=True, slots=True)
class ResendSettings:
    api_key: str = field(repr=False)
    sender: str  # the from field, e.g. "Elevra <uploads@example.org>" on a verified domain
    base_url: str = "https://api.resend.com"
    timeout_s: float = 30.0


class ResendTransport:
    """Sends through Resend; returns Resend's e-mail id.

    The message's idempotency key goes in the Idempotency-Key header: Resend answers a retry
    within 24 h with the first response instead of sending again, so retrying after a timeout is
    safe even when the first request got through. Pass `client` to share a connection pool (you
    close it); otherwise each send opens and closes its own, which suits a few e-mails per run.
    """

    idempotent = True  # Resend answers a repeated Idempotency-Key with the first e-mail's id

    def __init__(self, settings: ResendSettings, *, client: httpx2.AsyncClient | None = None):
        self.settings = settings
        self._client = client

    async def send(self, message: Message) -> str:
        size = base64_size(message.attachments)
        if size > RESEND_ATTACHMENT_LIMIT_BYTES:
            raise DeliveryError(
                f"attachments take {size} bytes in base64, over Resend's "
                f"{RESEND_ATTACHMENT_LIMIT_BYTES}; wrap the transport in LinkLargeAttachments",
                permanent=True,
            )
        s = self.settings
        headers = {"Authorization": f"Bearer {s.api_key}"}
        if message.idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_header(message.idempotency_key)
        url = f"{s.base_url.rstrip('/')}/emails"
        try:
            if self._client is not None:
                reply = await self._client.post(
                    url, json=self._body(message), headers=headers, timeout=s.timeout_s
                )
            else:
                async with httpx2.AsyncClient(timeout=s.timeout_s) as client:
                    reply = await client.post(url, json=self._body(message), headers=headers)
        except httpx2.TransportError as exc:  # refused, reset, timed out: maybe sent, key dedupes
            raise DeliveryError(
                f"Resend: {type(exc).__name__}: {exc}",
                permanent=False,
                maybe_sent=not isinstance(exc, httpx2.ConnectError),
            ) from exc
        if not reply.is_success:
            raise _status_error(reply)
        email_id = _json(reply).get("id")
        if not isinstance(email_id, str) or not email_id:
            # not Resend answering (a wrong base_url?): retrying the same URL will not help
            raise DeliveryError(
                f"Resend: {reply.status_code} without an e-mail id: {reply.text[:200]}",
                permanent=True,
                code=reply.status_code,
            )
        return email_id

    def _body(self, message: Message) -> dict[str, Any]:
        body: dict[str, Any] = {
            "from": self.settings.sender,
            "to": list(message.to),
            "subject": message.subject,
            "text": message.text,  # always sent: else Resend derives one from the HTML
        }
        if message.cc:
            body["cc"] = list(message.cc)
        if message.bcc:
            body["bcc"] = list(message.bcc)
        if message.html is not None:
            body["html"] = message.html
        if message.attachments:
            body["attachments"] = [
                {
                    "filename": a.filename,
                    "content": base64.b64encode(a.content).decode("ascii"),
                    "content_type": a.mime_type,
                }
                for a in message.attachments
            ]
        return body


def idempotency_header(key: str) -> str:
    """The key itself when Resend accepts its length, else a stable digest of it."""
    if 0 < len(key) <= _MAX_IDEMPOTENCY_KEY:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _json(reply: httpx2.Response) -> dict[str, Any]:
    try:
        data = reply.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _status_error(reply: httpx2.Response) -> DeliveryError:
    data = _json(reply)
    name = str(data.get("name", ""))
    detail = str(data.get("message", "")) or reply.text[:200]
    status = reply.status_code
    if status == 409:
        # the same key with another payload is refused for good; a key still in flight is not
        permanent = name == "invalid_idempotent_request"
    else:
        # 429: per-second rate or daily quota, both pass; 5xx is Resend's side; other 4xx say
        # the request itself is wrong (fields, key, unverified domain), so a retry fails alike
        permanent = 400 <= status < 500 and status not in (408, 429)
    text = f"Resend {status} {name}: {detail}" if name else f"Resend {status}: {detail}"
    return DeliveryError(text, permanent=permanent, code=status, retry_after_s=_retry_after(reply))


def _retry_after(reply: httpx2.Response) -> float | None:
    try:
        seconds = float(reply.headers.get("retry-after", ""))
    except ValueError:
        return None  # absent, or an HTTP date (Resend sends seconds)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
