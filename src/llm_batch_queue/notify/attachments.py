"""Attachments too large to send: stored elsewhere and linked from the message instead."""

from __future__ import annotations

import hashlib
import html
import os
import re
import uuid
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import quote

import anyio

from llm_batch_queue.notify.message import Attachment, Message, base64_size
from llm_batch_queue.notify.resend import RESEND_ATTACHMENT_LIMIT_BYTES
from llm_batch_queue.notify.transport import Transport


class AttachmentStore(Protocol):
    async def put(self, filename: str, content: bytes) -> str:
        """Keep `content` under `filename`; return a URL a recipient can open.

        The same content must give the same URL: a retried send then carries the same body,
        which providers that dedupe by idempotency key (Resend) require.
        """
        ...


class LocalDirectoryStore:
    """Writes each file to `directory/<content digest>/<filename>`.

    Returns `public_base_url` + that path when the directory is served over HTTP(S), else a
    `file://` URL (only useful to recipients on the same machine or share). The digest keeps two
    different files of the same name apart and makes a URL hard to guess, which is not access
    control: anyone with the link can read the file.
    """

    def __init__(self, directory: str | Path, public_base_url: str | None = None) -> None:
        self.directory = Path(directory)
        self.public_base_url = public_base_url

    async def put(self, filename: str, content: bytes) -> str:
        relative = f"{hashlib.sha256(content).hexdigest()[:32]}/{_safe_name(filename)}"
        path = await anyio.to_thread.run_sync(self._write, relative, content)
        if self.public_base_url is not None:
            return f"{self.public_base_url.rstrip('/')}/{quote(relative)}"
        return path.resolve().as_uri()

    def _write(self, relative: str, content: bytes) -> Path:
        path = self.directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        # write then rename: a reader following the link never sees half a file
        tmp = path.with_name(f".{uuid.uuid4().hex}.part")
        tmp.write_bytes(content)
        os.replace(tmp, path)
        return path


def _safe_name(filename: str) -> str:
    name = PurePosixPath(filename.replace("\\", "/")).name  # no directories, no "../"
    return name if name not in ("", ".", "..") else "attachment"


class LinkLargeAttachments:
    """A Transport that stores attachments and links them when they would exceed `max_bytes`.

    Sizes are counted after base64, as Resend counts them. The largest attachments move to
    `store` until the rest fits; each becomes a line in the text body and a link in the HTML
    body. A message within the limit passes through untouched.
    """

    def __init__(
        self,
        transport: Transport,
        store: AttachmentStore,
        max_bytes: int = RESEND_ATTACHMENT_LIMIT_BYTES,
    ) -> None:
        self.transport = transport
        self.store = store
        self.max_bytes = max_bytes

    @property
    def idempotent(self) -> bool:
        # the same message gives the same prepared message (content-addressed links)
        return self.transport.idempotent

    async def send(self, message: Message) -> str:
        return await self.transport.send(await self.prepare(message))

    async def prepare(self, message: Message) -> Message:
        """The message as it will be handed to the wrapped transport."""
        keep, move = self._split(message.attachments)
        if not move:
            return message
        links = [(a, await self.store.put(a.filename, a.content)) for a in move]
        return replace(
            message,
            attachments=keep,
            text=message.text + _text_links(links),
            html=None if message.html is None else _with_html_links(message.html, links),
        )

    def _split(
        self, attachments: tuple[Attachment, ...]
    ) -> tuple[tuple[Attachment, ...], tuple[Attachment, ...]]:
        total = base64_size(attachments)
        moved: set[int] = set()
        for i in sorted(range(len(attachments)), key=lambda i: -len(attachments[i].content)):
            if total <= self.max_bytes:
                break
            moved.add(i)
            total -= base64_size((attachments[i],))
        keep = tuple(a for i, a in enumerate(attachments) if i not in moved)
        return keep, tuple(a for i, a in enumerate(attachments) if i in moved)


def _size(a: Attachment) -> str:
    n = len(a.content)
    return f"{n / 1_000_000:.1f} MB" if n >= 100_000 else f"{-(-n // 1000)} kB"


def _text_links(links: list[tuple[Attachment, str]]) -> str:
    lines = "".join(f"- {a.filename} ({_size(a)}): {url}\n" for a, url in links)
    return f"\n\nToo large to attach, download here:\n{lines}"


_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)


def _with_html_links(body: str, links: list[tuple[Attachment, str]]) -> str:
    items = "".join(
        f'<li><a href="{html.escape(url)}">{html.escape(a.filename)}</a> ({_size(a)})</li>'
        for a, url in links
    )
    block = f"<p>Too large to attach, download here:</p>\n<ul>{items}</ul>\n"
    ends = list(_BODY_END.finditer(body))
    if not ends:  # a fragment: append
        return f"{body}\n{block}"
    at = ends[-1].start()  # inside the body, so clients that honour </body> still show it
    return body[:at] + block + body[at:]
