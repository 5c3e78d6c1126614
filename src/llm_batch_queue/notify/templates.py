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
    by dropping a file of the same name into their own directory. HTML is autoescaped.
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
        if epoch is None:
            return "n/a"
        return datetime.fromtimestamp(epoch, self.tz).strftime("%Y-%m-%d %H:%M:%S %Z")

    def render(self, kind: str, context: Mapping[str, Any]) -> Rendered:
        subject = self._text.get_template(f"{kind}.subject.j2").render(context)
        return Rendered(
            subject=" ".join(subject.split()),
            text=self._text.get_template(f"{kind}.txt.j2").render(context),
            html=self._html.get_template(f"{kind}.html.j2").render(context),
        )
