"""The HTTP face of the simulator: a ThreadingHTTPServer on a daemon thread."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from llm_batch_queue.simulator import payloads
from llm_batch_queue.simulator.config import ModelConfig
from llm_batch_queue.simulator.faults import Fault
from llm_batch_queue.simulator.responder import Responder, lorem_responder
from llm_batch_queue.simulator.service import GeminiService, Reply
from llm_batch_queue.simulator.stats import ModelStats

_MODEL_CALL = re.compile(r"^/(v1beta|v1)/models/([^/:]+):(generateContent|countTokens)$")


class Simulator:
    """A local Gemini-compatible endpoint. Point a client at `url` with api_version "v1beta"/"v1".

    Use as a context manager, or call `start()` and `close()`.
    """

    def __init__(
        self,
        models: Mapping[str, ModelConfig],
        *,
        responder: Responder = lorem_responder,
        clock: Callable[[], float] = time.time,
        seed: int = 0,
        api_keys: Collection[str] | None = None,  # None accepts any non-empty key
        host: str = "127.0.0.1",
        port: int = 0,  # 0 picks a free port
    ) -> None:
        self.service = GeminiService(
            models, responder=responder, clock=clock, seed=seed, api_keys=api_keys
        )
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the simulator is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Simulator:
        self._server = _Server(self._address, self.service)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="gemini-simulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is None:
            return
        self._server.stopping.set()  # release stalled handlers instead of leaving them asleep
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def configure(self, model: str, config: ModelConfig) -> None:
        self.service.configure(model, config)

    def force(
        self, model: str, fault: Fault, *, times: int = 1, retry_after_s: float | None = None
    ) -> None:
        self.service.force(model, fault, times=times, retry_after_s=retry_after_s)

    def stats(self) -> dict[str, ModelStats]:
        return self.service.stats()

    def admissions(self) -> dict[str, list[tuple[float, int]]]:
        return self.service.admissions()

    def reset(self) -> None:
        self.service.reset()


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # benchmarks open many connections at once
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], service: GeminiService) -> None:
        self.service = service
        self.stopping = threading.Event()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that went away mid-request (killed, timed out) is no server error
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: httpx2 reuses connections
    disable_nagle_algorithm = True  # else each reply waits ~40 ms for the ACK of its headers
    timeout = 60  # drop idle keep-alive connections eventually
    server: _Server

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/_sim/stats":
            self._send(Reply(200, {m: s.to_json() for m, s in self.server.service.stats().items()}))
        elif path == "/_sim/admissions":  # {model: [[epoch seconds, input tokens], ...]}
            self._send(Reply(200, dict(self.server.service.admissions())))
        else:
            self._send(_not_found(self.path))

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        body = self._read_json()
        service = self.server.service
        if url.path == "/_sim/reset":
            service.reset()
            self._send(Reply(200, {}))
        elif url.path == "/_sim/force":
            self._send(_force(service, body))
        elif match := _MODEL_CALL.match(url.path):
            api_version, model, method = match.groups()
            key = self.headers.get("x-goog-api-key") or parse_qs(url.query).get("key", [None])[0]
            reply = service.handle(
                api_version=api_version, model=model, method=method, body=body, api_key=key
            )
            if reply.delay_s > 0 and self.server.stopping.wait(reply.delay_s):
                self.close_connection = True  # shutting down: never answer a stalled request
                return
            self._send(reply)
        else:
            self._send(_not_found(self.path))

    def _read_json(self) -> dict[str, Any] | None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def _send(self, reply: Reply) -> None:
        data = json.dumps(reply.body).encode()
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: a benchmark serves thousands of requests."""


def _force(service: GeminiService, body: dict[str, Any] | None) -> Reply:
    """`{"model": ..., "fault": "429-day", "times": 2, "retry_after_s": 5}` from another process."""
    try:
        if body is None:
            raise ValueError("the body is not a JSON object")
        service.force(
            body["model"],
            Fault(body["fault"]),
            times=int(body.get("times", 1)),
            retry_after_s=body.get("retry_after_s"),
        )
    except (KeyError, ValueError, TypeError) as exc:
        return Reply(400, payloads.error(400, "INVALID_ARGUMENT", f"bad force request: {exc!r}"))
    return Reply(200, {})


def _not_found(path: str) -> Reply:
    return Reply(404, payloads.error(404, "NOT_FOUND", f"No handler for {path}."))
