"""LinkLargeAttachments and LocalDirectoryStore: over the limit a link, under it no change."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from llm_batch_queue.notify import (
    XLSX_MIME,
    Attachment,
    LinkLargeAttachments,
    LocalDirectoryStore,
    MemoryTransport,
    Message,
)

pytestmark = pytest.mark.anyio

HTML = "<!doctype html>\n<html><body><p>Done.</p>\n</body></html>"


def file_path(url: str) -> Path:
    parts = urlsplit(url)
    assert parts.scheme == "file"
    return Path(unquote(parts.path))


def message(*attachments: Attachment, html: str | None = HTML) -> Message:
    return Message(("a@example.org",), "s", "Done.", html, attachments, "r1/run_finished/")


async def test_over_the_limit_the_attachment_becomes_a_link(tmp_path: Path) -> None:
    inner = MemoryTransport()
    big = Attachment('results <"2026"> & more.xlsx', bytes(range(256)) * 40, XLSX_MIME)  # 10 240 B
    small = Attachment("notes.txt", b"hello", "text/plain")
    wrapped = LinkLargeAttachments(inner, LocalDirectoryStore(tmp_path), max_bytes=1_000)
    assert await wrapped.send(message(small, big)) == "memory-1"

    [sent] = inner.sent
    assert sent.attachments == (small,)
    intro, _, link_line = sent.text.partition("\n\nToo large to attach, download here:\n- ")
    assert intro == "Done."
    name, _, url = link_line.rstrip("\n").partition(" (11 kB): ")
    assert name == big.filename
    stored = file_path(url)
    assert stored.read_bytes() == big.content
    assert stored.is_relative_to(tmp_path.resolve())
    assert sent.html is not None
    escaped = "results &lt;&quot;2026&quot;&gt; &amp; more.xlsx"
    assert f'<a href="{url.replace("&", "&amp;")}">{escaped}</a>' in sent.html
    assert big.filename not in sent.html  # never raw
    assert sent.html.index(escaped) < sent.html.index("</body>")
    assert sent.html.endswith("</body></html>")


async def test_within_the_limit_the_message_is_unchanged(tmp_path: Path) -> None:
    inner = MemoryTransport()
    # 750 bytes are exactly 1 000 in base64: at the limit, not over it
    at_limit = message(Attachment("a.bin", b"x" * 750))
    wrapped = LinkLargeAttachments(inner, LocalDirectoryStore(tmp_path / "store"), max_bytes=1_000)
    await wrapped.send(at_limit)
    assert inner.sent == [at_limit]
    assert not (tmp_path / "store").exists()
    over = await wrapped.prepare(message(Attachment("a.bin", b"x" * 751)))
    assert over.attachments == ()


async def test_the_largest_move_until_the_rest_fits(tmp_path: Path) -> None:
    a, b, c = (Attachment(n, b"x" * size) for n, size in (("a", 600), ("b", 300), ("c", 450)))
    wrapped = LinkLargeAttachments(
        MemoryTransport(), LocalDirectoryStore(tmp_path), max_bytes=1_000
    )
    prepared = await wrapped.prepare(message(a, b, c))
    assert prepared.attachments == (b, c)  # 400 + 600 base64 bytes fit once a is out
    assert "- a (1 kB): file://" in prepared.text and "- b " not in prepared.text


async def test_a_text_only_message_gets_the_link_in_its_text(tmp_path: Path) -> None:
    wrapped = LinkLargeAttachments(MemoryTransport(), LocalDirectoryStore(tmp_path), max_bytes=10)
    prepared = await wrapped.prepare(message(Attachment("a.bin", b"x" * 100), html=None))
    assert prepared.html is None and "- a.bin (1 kB): file://" in prepared.text


async def test_an_html_fragment_gets_the_links_appended(tmp_path: Path) -> None:
    wrapped = LinkLargeAttachments(MemoryTransport(), LocalDirectoryStore(tmp_path), max_bytes=10)
    prepared = await wrapped.prepare(message(Attachment("a.bin", b"x" * 100), html="<p>Hi</p>"))
    assert prepared.html is not None
    assert prepared.html.startswith("<p>Hi</p>\n<p>Too large to attach")
    assert prepared.html.rstrip().endswith("</ul>")


async def test_sizes_read_in_kilobytes_or_megabytes(tmp_path: Path) -> None:
    wrapped = LinkLargeAttachments(MemoryTransport(), LocalDirectoryStore(tmp_path), max_bytes=10)
    prepared = await wrapped.prepare(message(Attachment("big.bin", b"x" * 52_345_678)))
    assert "- big.bin (52.3 MB): " in prepared.text


async def test_same_content_same_url_so_a_retry_sends_the_same_body(tmp_path: Path) -> None:
    inner = MemoryTransport()
    wrapped = LinkLargeAttachments(inner, LocalDirectoryStore(tmp_path), max_bytes=10)
    msg = message(Attachment("report.xlsx", b"v1" * 50))
    await wrapped.send(msg)
    await wrapped.send(msg)
    assert inner.sent[0] == inner.sent[1]
    other = await wrapped.prepare(message(Attachment("report.xlsx", b"v2" * 50)))
    assert other.text != inner.sent[0].text  # same name, other content: its own file
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["report.xlsx"] * 2


async def test_public_base_url_and_hostile_names(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path, public_base_url="https://files.example.org/mail/")
    url = await store.put("../../etc/my report.xlsx", b"data")
    prefix = "https://files.example.org/mail/"
    assert url.startswith(prefix) and url.endswith("/my%20report.xlsx")
    [stored] = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert stored.relative_to(tmp_path).as_posix() == unquote(url.removeprefix(prefix))
    assert stored.read_bytes() == b"data"
    assert (await store.put("..", b"x")).endswith("/attachment")
    assert (await store.put("C:\\Users\\x\\book.xlsx", b"y")).endswith("/book.xlsx")
