"""ResendTransport against a local HTTP endpoint that plays Resend's POST /emails."""

from __future__ import annotations

import base64
import socket
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mailservers import FakeResend, Reply

from llm_batch_queue.notify import (
    RESEND_ATTACHMENT_LIMIT_BYTES,
    XLSX_MIME,
    Attachment,
    DeliveryError,
    LinkLargeAttachments,
    LocalDirectoryStore,
    Message,
    ResendSettings,
    ResendTransport,
)

pytestmark = pytest.mark.anyio

KEY = "re_test_key"


def transport(url: str, timeout_s: float = 5.0) -> ResendTransport:
    return ResendTransport(
        ResendSettings(
            api_key=KEY, sender="Elevra <uploads@elevra.test>", base_url=url, timeout_s=timeout_s
        )
    )


def message(**kwargs: Any) -> Message:
    fields: dict[str, Any] = {
        "to": ("uploader@example.org",),
        "subject": "Elevra upload r1 – finished",
        "text": "Plain ✓",
        "html": "<p>HTML ✓</p>",
        "idempotency_key": "r1/run_finished/",
    }
    fields.update(kwargs)
    return Message(**fields)


async def test_posts_resends_shape_and_returns_its_id(resend: FakeResend) -> None:
    content = bytes(range(256)) * 3  # every byte value: base64 must round-trip exactly
    msg = message(
        cc=("team@example.org",),
        bcc=("archive@example.org",),
        attachments=(Attachment("elevra-upload-r1.xlsx", content, XLSX_MIME),),
    )
    assert await transport(resend.url + "/").send(msg) == "email-1"
    [req] = resend.requests
    assert (req.method, req.path) == ("POST", "/emails")
    assert req.headers["Authorization"] == f"Bearer {KEY}"
    assert req.headers["Idempotency-Key"] == "r1/run_finished/"
    assert req.headers["Content-Type"] == "application/json"
    attachments = req.body.pop("attachments")
    assert req.body == {
        "from": "Elevra <uploads@elevra.test>",
        "to": ["uploader@example.org"],
        "cc": ["team@example.org"],
        "bcc": ["archive@example.org"],
        "subject": "Elevra upload r1 – finished",
        "text": "Plain ✓",
        "html": "<p>HTML ✓</p>",
    }
    assert [(a["filename"], a["content_type"]) for a in attachments] == [
        ("elevra-upload-r1.xlsx", XLSX_MIME)
    ]
    assert base64.b64decode(attachments[0]["content"], validate=True) == content


async def test_a_bare_message_sends_only_what_it_has(resend: FakeResend) -> None:
    await transport(resend.url).send(message(html=None, idempotency_key=None))
    [req] = resend.requests
    assert "Idempotency-Key" not in req.headers
    assert set(req.body) == {"from", "to", "subject", "text"}


async def test_a_retry_carries_the_same_idempotency_key(resend: FakeResend) -> None:
    resend.replies = [Reply(500, {"statusCode": 500, "name": "internal_server_error"})]
    t, msg = transport(resend.url), message()
    with pytest.raises(DeliveryError):
        await t.send(msg)
    await t.send(msg)
    assert [r.headers["Idempotency-Key"] for r in resend.requests] == ["r1/run_finished/"] * 2
    assert resend.requests[0].body == resend.requests[1].body  # else Resend answers 409
    assert len(resend.delivered) == 1


async def test_a_repeated_key_gets_the_first_answer_and_one_delivery(resend: FakeResend) -> None:
    # what the outbox relies on after a crash between send and mark (FakeResend dedupes as
    # Resend documents it does)
    t = transport(resend.url)
    assert t.idempotent
    assert [await t.send(message()) for _ in range(2)] == ["email-1", "email-1"]
    assert len(resend.requests) == 2 and len(resend.delivered) == 1


async def test_an_overlong_key_is_digested_stably(resend: FakeResend) -> None:
    key = "r1/item_failed/" + "k" * 300
    t = transport(resend.url)
    await t.send(message(idempotency_key=key))
    await t.send(message(idempotency_key=key))
    sent = [r.headers["Idempotency-Key"] for r in resend.requests]
    assert sent[0] == sent[1] and sent[0].startswith("sha256:") and len(sent[0]) <= 256


async def test_429_is_transient_and_keeps_retry_after(resend: FakeResend) -> None:
    resend.replies = [
        Reply(
            429,
            {"statusCode": 429, "name": "rate_limit_exceeded", "message": "Too many requests."},
            {"Retry-After": "7"},
        )
    ]
    with pytest.raises(DeliveryError) as err:
        await transport(resend.url).send(message())
    assert not err.value.permanent
    assert (err.value.code, err.value.retry_after_s) == (429, 7.0)
    assert "rate_limit_exceeded: Too many requests." in str(err.value)


@pytest.mark.parametrize(
    ("status", "name", "permanent"),
    [
        (500, "internal_server_error", False),
        (503, "", False),
        (409, "concurrent_idempotent_requests", False),
        (409, "invalid_idempotent_request", True),
        (422, "validation_error", True),
        (400, "invalid_idempotency_key", True),
        (401, "missing_api_key", True),
        (403, "invalid_api_key", True),
    ],
)
async def test_status_codes_map_to_permanent_or_transient(
    resend: FakeResend, status: int, name: str, permanent: bool
) -> None:
    resend.replies = [Reply(status, {"statusCode": status, "name": name, "message": "why"})]
    with pytest.raises(DeliveryError) as err:
        await transport(resend.url).send(message())
    assert (err.value.permanent, err.value.code) == (permanent, status)
    assert len(resend.requests) == 1


async def test_422_carries_resends_explanation(resend: FakeResend) -> None:
    why = "The `to` field must be a `string`."
    resend.replies = [Reply(422, {"statusCode": 422, "name": "validation_error", "message": why})]
    with pytest.raises(DeliveryError) as err:
        await transport(resend.url).send(message())
    assert str(err.value) == f"Resend 422 validation_error: {why} (permanent)"


async def test_a_success_without_an_id_is_permanent(resend: FakeResend) -> None:
    resend.replies = [Reply(200, {"ok": True})]
    with pytest.raises(DeliveryError, match="without an e-mail id") as err:
        await transport(resend.url).send(message())
    assert err.value.permanent


async def test_a_refused_connection_is_transient() -> None:
    with socket.socket() as sock:  # bound, never listening: the kernel refuses connections
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(DeliveryError, match="ConnectError") as err:
            await transport(url).send(message())
    assert not err.value.permanent


async def test_a_server_that_never_answers_times_out_transiently() -> None:
    with socket.socket() as sock:  # listening, never accepting: no reply ever comes
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(DeliveryError, match="Timeout") as err:
            await transport(url, timeout_s=0.2).send(message())
    assert not err.value.permanent


async def test_attachments_over_the_limit_are_refused_before_sending(resend: FakeResend) -> None:
    # 30 MB of bytes is 40 MB of base64: Resend counts after encoding
    big = Attachment("big.bin", b"\0" * (RESEND_ATTACHMENT_LIMIT_BYTES * 3 // 4 + 3))
    with pytest.raises(DeliveryError, match="LinkLargeAttachments") as err:
        await transport(resend.url).send(message(attachments=(big,)))
    assert err.value.permanent
    assert resend.requests == []


async def test_wrapped_in_link_large_attachments_the_default_limit_is_resends(
    resend: FakeResend, tmp_path: Path
) -> None:
    big = Attachment("big.bin", b"\0" * (RESEND_ATTACHMENT_LIMIT_BYTES * 3 // 4 + 3))
    small = Attachment("small.txt", b"kept", "text/plain")
    wrapped = LinkLargeAttachments(transport(resend.url), LocalDirectoryStore(tmp_path))
    assert await wrapped.send(message(attachments=(big, small))) == "email-1"
    [req] = resend.requests
    assert [a["filename"] for a in req.body["attachments"]] == ["small.txt"]
    assert "- big.bin (30.0 MB): file://" in req.body["text"]
    assert ">big.bin</a>" in req.body["html"]


async def test_a_shared_client_is_used_and_left_open(resend: FakeResend) -> None:
    async with httpx2.AsyncClient() as client:
        t = ResendTransport(
            ResendSettings(api_key=KEY, sender="uploads@elevra.test", base_url=resend.url),
            client=client,
        )
        sent = [await t.send(message(idempotency_key=f"r{i}")) for i in range(2)]
        assert sent == ["email-1", "email-2"]
        assert not client.is_closed
    assert len(resend.requests) == 2


def test_the_api_key_stays_out_of_reprs() -> None:
    assert KEY not in repr(ResendSettings(api_key=KEY, sender="uploads@elevra.test"))
