"""SMTP delivery with the standard library, run in a worker thread.

Why stdlib `smtplib` and not an async client: it is always there, covers STARTTLS, implicit TLS
and AUTH, and a notification is a handful of e-mails per run, so a thread per send costs nothing
that matters. An async SMTP client would be one more dependency to keep current for no gain here.
"""

from __future__ import annotations

import hashlib
import smtplib
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from llm_batch_queue.errors import ConfigError
from llm_batch_queue.notify.errors import DeliveryError
from llm_batch_queue.notify.message import Message

if TYPE_CHECKING:
    from typing_extensions import Buffer


@dataclass(frozen=True, slots=True)
class SMTPSettings:
    host: str
    sender: str  # the From header, e.g. "Elevra <uploads@example.org>"
    port: int = 587
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    starttls: bool = True  # upgrade a plain connection (port 587)
    ssl: bool = False  # implicit TLS from the first byte (port 465)
    timeout_s: float = 30.0  # per connect and per reply
    ca_file: Path | None = None  # trust this CA bundle instead of the system's
    allow_plaintext_auth: bool = False

    def __post_init__(self) -> None:
        if self.starttls and self.ssl:
            raise ConfigError("SMTPSettings: starttls and ssl exclude each other; choose one")
        if "@" not in parseaddr(self.sender)[1]:
            raise ConfigError(f"SMTPSettings: sender {self.sender!r} has no address")
        if (self.username is None) != (self.password is None):
            raise ConfigError("SMTPSettings: username and password go together")
        encrypted = self.starttls or self.ssl
        if self.username is not None and not encrypted and not self.allow_plaintext_auth:
            raise ConfigError(
                "SMTPSettings: credentials over an unencrypted connection; set starttls or ssl "
                "(or allow_plaintext_auth for a trusted local relay)"
            )


def message_id(idempotency_key: str | None, sender: str) -> str:
    """Stable for a key, so a retried send carries the Message-ID of the first try and
    receiving systems can tell the copies apart from new mail."""
    domain = parseaddr(sender)[1].rpartition("@")[2]
    if idempotency_key is None:
        return make_msgid(domain=domain)
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    return f"<{digest}@{domain}>"


def build_email(message: Message, sender: str, msg_id: str) -> EmailMessage:
    email = EmailMessage()
    email["From"] = sender
    if message.to:
        email["To"] = ", ".join(message.to)
    if message.cc:
        email["Cc"] = ", ".join(message.cc)
    email["Subject"] = message.subject
    email["Date"] = formatdate(localtime=False)
    email["Message-ID"] = msg_id
    email.set_content(message.text)
    if message.html is not None:
        email.add_alternative(message.html, subtype="html")
    for a in message.attachments:
        maintype, _, subtype = a.mime_type.partition("/")
        if not maintype or not subtype:
            maintype, subtype = "application", "octet-stream"
        email.add_attachment(a.content, maintype=maintype, subtype=subtype, filename=a.filename)
    return email


class _SMTP(smtplib.SMTP):
    """Notes when the message itself starts going out: a failure after that may have
    delivered it (the server can take the data and the connection drop before its reply)."""

    data_started = False

    def data(self, msg: Buffer | str) -> tuple[int, bytes]:
        self.data_started = True
        return super().data(msg)


class _SMTPS(smtplib.SMTP_SSL):
    data_started = False

    def data(self, msg: Buffer | str) -> tuple[int, bytes]:
        self.data_started = True
        return super().data(msg)


class SMTPTransport:
    """Sends each message over its own SMTP connection; returns the Message-ID it set.

    Not idempotent: SMTP has no way to ask a server to drop a second copy, so the outbox never
    re-sends a row whose fate is unknown (a crash mid-send, a connection lost during the data).
    The Message-ID is still stable per outbox row, so copies can be recognised downstream.
    """

    idempotent = False

    def __init__(self, settings: SMTPSettings) -> None:
        self.settings = settings

    async def send(self, message: Message) -> str:
        msg_id = message_id(message.idempotency_key, self.settings.sender)
        try:
            email = build_email(message, self.settings.sender, msg_id)
        except ValueError as exc:  # e.g. a line break in the subject: it will never build
            raise DeliveryError(f"cannot build the e-mail: {exc}", permanent=True) from exc
        recipients = list(dict.fromkeys((*message.to, *message.cc, *message.bcc)))
        if not recipients:
            raise DeliveryError("no recipients", permanent=True)
        await anyio.to_thread.run_sync(self._deliver, email, recipients)
        return msg_id

    def _deliver(self, email: EmailMessage, recipients: list[str]) -> None:
        s = self.settings
        smtp: _SMTP | _SMTPS | None = None
        try:
            smtp = self._connect()
            try:
                if s.starttls:
                    smtp.starttls(context=self._tls_context())
                if s.username is not None and s.password is not None:
                    smtp.login(s.username, s.password)
                refused = smtp.send_message(
                    email, from_addr=parseaddr(s.sender)[1], to_addrs=recipients
                )
            finally:
                _hang_up(smtp)
        except smtplib.SMTPRecipientsRefused as exc:  # every recipient refused
            raise _refused(exc.recipients, delivered=0) from exc
        except smtplib.SMTPResponseException as exc:
            raise _reply_error(exc) from exc
        except smtplib.SMTPNotSupportedError as exc:  # e.g. no STARTTLS or AUTH offered
            raise DeliveryError(f"SMTP server: {exc}", permanent=True) from exc
        except ssl.SSLCertVerificationError as exc:  # a setup problem, not a passing one
            raise DeliveryError(f"TLS: {exc.verify_message}", permanent=True) from exc
        except (smtplib.SMTPException, OSError) as exc:  # refused, reset, timed out, TLS
            raise DeliveryError(
                f"SMTP {s.host}:{s.port}: {type(exc).__name__}: {exc}",
                permanent=False,
                # no reply to the data: the server may have queued the message all the same
                maybe_sent=smtp is not None and smtp.data_started,
            ) from exc
        if refused:
            # the others have it already: a retry would send them a second copy
            raise _refused(refused, delivered=len(recipients) - len(refused), permanent=True)

    def _connect(self) -> _SMTP | _SMTPS:
        s = self.settings
        if s.ssl:
            return _SMTPS(s.host, s.port, timeout=s.timeout_s, context=self._tls_context())
        return _SMTP(s.host, s.port, timeout=s.timeout_s)

    def _tls_context(self) -> ssl.SSLContext:
        ca = self.settings.ca_file
        return ssl.create_default_context(cafile=str(ca) if ca is not None else None)


def _hang_up(smtp: smtplib.SMTP) -> None:
    # not `with SMTP()`: its QUIT raises on an odd reply, which after DATA was accepted would
    # turn a delivered message into an error, and a retry into a second copy
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


def _decode(reply: bytes | str) -> str:
    return reply.decode(errors="replace") if isinstance(reply, bytes) else reply


def _reply_error(exc: smtplib.SMTPResponseException) -> DeliveryError:
    text = f"SMTP {exc.smtp_code} {_decode(exc.smtp_error)}"
    # 5xx is the server's final answer; 4xx (and odd codes such as -1) may pass
    return DeliveryError(text, permanent=500 <= exc.smtp_code < 600, code=exc.smtp_code)


def _refused(
    refused: dict[str, tuple[int, bytes]], *, delivered: int, permanent: bool | None = None
) -> DeliveryError:
    detail = "; ".join(f"{r}: {code} {_decode(why)}" for r, (code, why) in refused.items())
    codes = [code for code, _ in refused.values()]
    if permanent is None:
        permanent = all(500 <= c < 600 for c in codes)
    text = f"SMTP refused {len(refused)} recipient(s), delivered to {delivered}: {detail}"
    return DeliveryError(text, permanent=permanent, code=max(codes))
