"""Real mail endpoints on 127.0.0.1 for the notification tests: an SMTP server (aiosmtpd) that
keeps what it accepted, and an HTTP server that plays Resend's POST /emails (conftest.py has the
fixtures `serve` and `resend`)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    email: EmailMessage
    tls: bool
    authenticated: bool | None


class Recorder:
    """aiosmtpd handler: keeps what was accepted; refuses listed recipients or the data."""

    def __init__(
        self,
        refuse: dict[str, str] | None = None,
        data_reply: str = "250 OK",
        quit_reply: str = "221 Bye",
        drop_after_data: bool = False,
    ) -> None:
        self.refuse = refuse or {}
        self.data_reply = data_reply
        self.quit_reply = quit_reply
        # keep the message, then hang up instead of replying: the client cannot know it arrived
        self.drop_after_data = drop_after_data
        self.received: list[Received] = []

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        return self.quit_reply

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply.startswith("250"):
            email = message_from_bytes(envelope.original_content, policy=policy.default)
            assert isinstance(email, EmailMessage)
            self.received.append(
                Received(
                    envelope.mail_from,
                    list(envelope.rcpt_tos),
                    email,
                    session.ssl is not None,
                    session.authenticated,
                )
            )
        if self.drop_after_data:
            server.transport.abort()
        return self.data_reply


class EphemeralController(Controller):  # type: ignore[misc]
    """Binds port 0 and learns the port the OS chose, so parallel runs never collide."""

    def __init__(self, handler: Recorder, **kwargs: Any) -> None:
        super().__init__(handler, hostname="127.0.0.1", port=0, server_hostname="mx.test", **kwargs)

    def _trigger_server(self) -> None:
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


class FakeResend(ThreadingHTTPServer):
    """Records every request and answers with the scripted replies in turn (then 200 + id)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[Request] = []
        self.replies: list[Reply] = []
        self.lock = threading.Lock()
        # as Resend does: a repeated Idempotency-Key gets the first reply and sends nothing
        self.dedupe = True
        self.delivered: list[Request] = []
        self.first_reply: dict[str, Reply] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeResend

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        request = Request("POST", self.path, dict(self.headers.items()), json.loads(raw))
        key = request.headers.get("Idempotency-Key")
        with self.server.lock:
            self.server.requests.append(request)
            n = len(self.server.requests)
            reply = self.server.first_reply.get(key) if key and self.server.dedupe else None
            if reply is None:
                reply = self.server.replies.pop(0) if self.server.replies else None
                reply = reply or Reply(200, {"id": f"email-{n}"})
                if reply.status == 200:
                    self.server.delivered.append(request)
                    if key:
                        self.server.first_reply[key] = reply
        data = json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass
