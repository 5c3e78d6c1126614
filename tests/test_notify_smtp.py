"""SMTPTransport against a real SMTP server (aiosmtpd) on 127.0.0.1: content, TLS, AUTH, errors."""

from __future__ import annotations

import datetime as dt
import io
import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import openpyxl
import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from mailservers import Recorder

from llm_batch_queue.errors import ConfigError
from llm_batch_queue.notify import (
    XLSX_MIME,
    Attachment,
    DeliveryError,
    Message,
    SMTPSettings,
    SMTPTransport,
)

pytestmark = pytest.mark.anyio

SENDER = "Elevra <uploads@elevra.test>"


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A throwaway CA and a server certificate it signed for 127.0.0.1 and localhost."""
    out = tmp_path_factory.mktemp("tls")
    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lbq test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(out / "ca.pem", out / "cert.pem", out / "key.pem")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def body(part: EmailMessage | None) -> str:
    assert part is not None
    content: str = part.get_content()
    return content.replace("\r\n", "\n")  # as it came off the wire


def plain(port: int, **kwargs: Any) -> SMTPSettings:
    return SMTPSettings(
        host="127.0.0.1", port=port, sender=SENDER, starttls=False, timeout_s=5.0, **kwargs
    )


def workbook_bytes() -> bytes:
    wb = openpyxl.Workbook()
    ws = wb.active
    assert ws is not None
    ws.append(["candidate", "office"])
    ws.append(["Ada Lovelace", "Mayor"])
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()


def message(**kwargs: Any) -> Message:
    fields: dict[str, Any] = {
        "to": ("uploader@example.org",),
        "subject": "Elevra upload r1 – finished",
        "text": "Plain body ✓\n",
        "html": "<p>HTML body ✓</p>",
        "idempotency_key": "r1/run_finished/",
    }
    fields.update(kwargs)
    return Message(**fields)


async def test_delivers_both_parts_cc_bcc_and_the_exact_attachment_bytes(serve: Any) -> None:
    handler = Recorder()
    port = serve(handler)
    xlsx = workbook_bytes()
    msg = message(
        cc=("team@example.org",),
        bcc=("archive@example.org",),
        attachments=(Attachment("elevra-upload-r1.xlsx", xlsx, XLSX_MIME),),
    )
    msg_id = await SMTPTransport(plain(port)).send(msg)

    [got] = handler.received
    assert got.mail_from == "uploads@elevra.test"
    assert got.rcpt_tos == ["uploader@example.org", "team@example.org", "archive@example.org"]
    email = got.email
    assert email["From"] == SENDER
    assert email["To"] == "uploader@example.org"
    assert email["Cc"] == "team@example.org"
    assert email["Bcc"] is None  # a blind copy stays blind
    assert email["Subject"] == "Elevra upload r1 – finished"
    assert email["Message-ID"] == msg_id
    text, html = email.get_body(("plain",)), email.get_body(("html",))
    assert body(text) == "Plain body ✓\n"
    assert body(html) == "<p>HTML body ✓</p>\n"
    [attachment] = list(email.iter_attachments())
    assert isinstance(attachment, EmailMessage)
    assert attachment.get_filename() == "elevra-upload-r1.xlsx"
    assert attachment.get_content_type() == XLSX_MIME
    assert attachment.get_content() == xlsx
    sheet = openpyxl.load_workbook(io.BytesIO(attachment.get_content())).active
    assert sheet is not None and sheet["A2"].value == "Ada Lovelace"


async def test_text_only_message_is_not_multipart(serve: Any) -> None:
    handler = Recorder()
    await SMTPTransport(plain(serve(handler))).send(message(html=None))
    email = handler.received[0].email
    assert email.get_content_type() == "text/plain"
    assert body(email) == "Plain body ✓\n"


async def test_message_id_is_stable_per_idempotency_key(serve: Any) -> None:
    handler = Recorder()
    transport = SMTPTransport(plain(serve(handler)))
    first = await transport.send(message())
    again = await transport.send(message())
    other = await transport.send(message(idempotency_key="r1/run_queued/"))
    unkeyed = [await transport.send(message(idempotency_key=None)) for _ in range(2)]
    assert first == again != other
    assert unkeyed[0] != unkeyed[1]
    assert first.startswith("<") and first.endswith("@elevra.test>")
    assert [r.email["Message-ID"] for r in handler.received] == [first, again, other, *unkeyed]


def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"mailer", b"s3cret")
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd replies 535


async def test_starttls_then_auth(serve: Any, tls: TLSFiles) -> None:
    handler = Recorder()
    port = serve(
        handler,
        tls_context=tls.server_context(),
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
    )
    settings = SMTPSettings(
        host="127.0.0.1",
        port=port,
        sender=SENDER,
        username="mailer",
        password="s3cret",
        starttls=True,
        ca_file=tls.ca,
        timeout_s=5.0,
    )
    assert "s3cret" not in repr(settings)
    await SMTPTransport(settings).send(message())
    [got] = handler.received
    assert (got.tls, got.authenticated) == (True, True)


async def test_a_wrong_password_is_permanent(serve: Any, tls: TLSFiles) -> None:
    handler = Recorder()
    port = serve(
        handler,
        tls_context=tls.server_context(),
        authenticator=authenticator,
        auth_required=True,
    )
    settings = SMTPSettings(
        host="127.0.0.1",
        port=port,
        sender=SENDER,
        username="mailer",
        password="wrong",
        ca_file=tls.ca,
        timeout_s=5.0,
    )
    with pytest.raises(DeliveryError) as err:
        await SMTPTransport(settings).send(message())
    assert err.value.permanent and err.value.code == 535
    assert handler.received == []


async def test_an_untrusted_certificate_is_permanent(serve: Any, tls: TLSFiles) -> None:
    port = serve(Recorder(), tls_context=tls.server_context())
    settings = SMTPSettings(host="127.0.0.1", port=port, sender=SENDER, timeout_s=5.0)
    with pytest.raises(DeliveryError, match="TLS: ") as err:
        await SMTPTransport(settings).send(message())
    assert err.value.permanent


async def test_starttls_asked_of_a_server_without_it_is_permanent(serve: Any) -> None:
    port = serve(Recorder())
    settings = SMTPSettings(host="127.0.0.1", port=port, sender=SENDER, timeout_s=5.0)
    with pytest.raises(DeliveryError, match="STARTTLS") as err:
        await SMTPTransport(settings).send(message())
    assert err.value.permanent


async def test_implicit_tls(serve: Any, tls: TLSFiles) -> None:
    handler = Recorder()
    port = serve(handler, ssl_context=tls.server_context())
    settings = SMTPSettings(
        host="127.0.0.1",
        port=port,
        sender=SENDER,
        starttls=False,
        ssl=True,
        ca_file=tls.ca,
        timeout_s=5.0,
    )
    await SMTPTransport(settings).send(message())
    assert handler.received[0].email["Subject"] == "Elevra upload r1 – finished"


async def test_a_refused_connection_is_transient() -> None:
    with socket.socket() as sock:  # bound, never listening: the kernel refuses connections
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(DeliveryError, match="ConnectionRefusedError") as err:
            await SMTPTransport(plain(port)).send(message())
    assert not err.value.permanent and err.value.code is None
    assert not err.value.maybe_sent  # nothing was handed over: a retry cannot duplicate


async def test_a_connection_lost_after_the_data_may_have_delivered(serve: Any) -> None:
    # the server took the message and hung up before answering: it may well be in the mailbox
    handler = Recorder(drop_after_data=True)
    transport = SMTPTransport(plain(serve(handler)))
    assert not transport.idempotent
    with pytest.raises(DeliveryError) as err:
        await transport.send(message())
    assert err.value.maybe_sent and not err.value.permanent
    assert len(handler.received) == 1


async def test_a_server_that_never_greets_times_out_transiently() -> None:
    with socket.socket() as sock:  # listening, never accepting: the greeting never comes
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        settings = SMTPSettings(
            host="127.0.0.1", port=port, sender=SENDER, starttls=False, timeout_s=0.2
        )
        with pytest.raises(DeliveryError, match="timed out") as err:
            await SMTPTransport(settings).send(message())
    assert not err.value.permanent


async def test_a_5xx_recipient_rejection_is_permanent(serve: Any) -> None:
    port = serve(Recorder(refuse={"uploader@example.org": "550 5.1.1 No such user"}))
    with pytest.raises(DeliveryError, match="No such user") as err:
        await SMTPTransport(plain(port)).send(message())
    assert err.value.permanent and err.value.code == 550


async def test_a_4xx_recipient_rejection_is_transient(serve: Any) -> None:
    port = serve(Recorder(refuse={"uploader@example.org": "450 4.2.1 Mailbox busy"}))
    with pytest.raises(DeliveryError) as err:
        await SMTPTransport(plain(port)).send(message())
    assert not err.value.permanent and err.value.code == 450


async def test_a_4xx_data_reply_is_transient_and_5xx_permanent(serve: Any) -> None:
    busy = SMTPTransport(plain(serve(Recorder(data_reply="451 4.3.0 Try again later"))))
    with pytest.raises(DeliveryError) as err:
        await busy.send(message())
    assert not err.value.permanent and err.value.code == 451
    spam = SMTPTransport(plain(serve(Recorder(data_reply="554 5.7.1 Looks like spam"))))
    with pytest.raises(DeliveryError, match="Looks like spam") as err:
        await spam.send(message())
    assert err.value.permanent and err.value.code == 554


async def test_a_partly_refused_message_is_not_retried(serve: Any) -> None:
    # the accepted recipients have it: a retry would send them a second copy
    handler = Recorder(refuse={"typo@example.org": "550 5.1.1 No such user"})
    port = serve(handler)
    with pytest.raises(
        DeliveryError, match=re.escape("delivered to 1: typo@example.org: 550")
    ) as err:
        await SMTPTransport(plain(port)).send(message(cc=("typo@example.org",)))
    assert err.value.permanent
    assert handler.received[0].rcpt_tos == ["uploader@example.org"]


async def test_an_odd_reply_to_quit_after_delivery_is_no_error(serve: Any) -> None:
    # DATA was accepted: the message is on its way, so a retry would only send a second copy
    handler = Recorder(quit_reply="421 4.3.2 Shutting down")
    msg_id = await SMTPTransport(plain(serve(handler))).send(message())
    assert [r.email["Message-ID"] for r in handler.received] == [msg_id]


async def test_a_subject_with_a_line_break_is_permanent() -> None:
    with pytest.raises(DeliveryError, match="cannot build") as err:
        await SMTPTransport(plain(1)).send(message(subject="two\nlines"))
    assert err.value.permanent


def test_settings_reject_contradictions() -> None:
    with pytest.raises(ConfigError, match="exclude"):
        SMTPSettings(host="h", sender=SENDER, starttls=True, ssl=True)
    with pytest.raises(ConfigError, match="unencrypted"):
        SMTPSettings(host="h", sender=SENDER, starttls=False, username="u", password="p")
    with pytest.raises(ConfigError, match="no address"):
        SMTPSettings(host="h", sender="Elevra")
    with pytest.raises(ConfigError, match="together"):
        SMTPSettings(host="h", sender=SENDER, username="u")
    relay = SMTPSettings(
        host="h",
        sender=SENDER,
        starttls=False,
        username="u",
        password="p",
        allow_plaintext_auth=True,
    )
    assert relay.username == "u"
