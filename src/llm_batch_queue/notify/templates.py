"""Notification templates: subject, plain text and HTML per kind, from Jinja2."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jinja2


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    text: str
    html: str


class TemplateRenderer:
    """Renders `<kind>.subject.j2`, `<kind>.txt.j2` and `<kind>.html.j2`.

    Directories earlier in `directories` override later ones, so users can replace any template
    by dropping a file of the same name into their own directory. HTML is autoescaped. The
    `localtime` filter shows an epoch in the renderer's zone, named.
    """

    def __init__(self, directories: Sequence[str | Path], tz: str = "UTC") -> None:
        self.tz = ZoneInfo(tz)
        loader = jinja2.FileSystemLoader([str(d) for d in directories])
        self._html = jinja2.Environment(
            loader=loader, autoescape=True, undefined=jinja2.StrictUndefined
        )
        self._text = jinja2.Environment(
            loader=loader, autoescape=False, undefined=jinja2.StrictUndefined
        )
        for env in (self._html, self._text):
            env.filters["localtime"] = self._localtime

    def _localtime(self, epoch: float | None) -> str:
        """`2025-10-08 10:15:07 EDT (America/New_York)`: the abbreviation alone is ambiguous
        (CST is three zones), and a fixed offset is wrong half the year (D-26)."""
        if epoch is None:
            return "n/a"
        local = datetime.fromtimestamp(epoch, self.tz)
        text = local.strftime("%Y-%m-%d %H:%M:%S %Z")
        return text if local.tzname() == self.tz.key else f"{text} ({self.tz.key})"

    def render(self, kind: str, context: Mapping[str, Any]) -> Rendered:
        subject = self._text.get_template(f"{kind}.subject.j2").render(context)
        return Rendered(
            subject=" ".join(subject.split()),
            text=self._text.get_template(f"{kind}.txt.j2").render(context),
            html=self._html.get_template(f"{kind}.html.j2").render(context),
        )
