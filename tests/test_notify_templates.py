"""Templates: the app's e-mails render for every kind, HTML is escaped, users override by name,
and times carry their zone's name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from examples.elevra_upload.notifications import TEMPLATES
from llm_batch_queue.notify import TemplateRenderer

JULY = 1_751_980_507.0  # 2025-07-08 13:15:07 UTC
JANUARY = 1_736_342_107.0  # 2025-01-08 13:15:07 UTC

COUNTS = {"total": 3, "completed": 1, "running": 1, "queued": 0, "needs_reupload": 1}


def context(**extra: Any) -> dict[str, Any]:
    return {
        "run": {"id": "r1", "name": "upload.csv"},
        "meta": {"rows": 9, "rejected": []},
        "now": JULY,
        "at": JULY,
        "counts": COUNTS,
        **extra,
    }


STAGE = {"name": "analyze", "title": "Analyze", "succeeded": 2, "failed": 1, "cancelled": 0}
FINAL = {
    "status": "completed_with_failures",
    "elections": 2,
    "candidates": 5,
    "fallbacks": 1,
    "failed_attempts": 3,
    "input_tokens": 12_345,
    "output_tokens": 678,
    "cost": "$0.02",
    "stages": [{"name": "analyze", "started": JANUARY, "finished": JULY}],
    "hidden": True,
    "workbook": "elevra-upload-r1.xlsx",
    "failed": [{"label": "Mayor – NC – 2025-11-04", "error": "insert refused"}],
}


@pytest.mark.parametrize(
    ("kind", "extra", "subject"),
    [
        ("run_queued", {}, "Upload queued – upload.csv (3 batches)"),
        ("stage_complete", {"stage": STAGE}, "Analyze phase finished with failures – upload.csv"),
        (
            "stage_complete",
            {"stage": {**STAGE, "name": "insert", "title": "Insert", "failed": 0}},
            "Insert phase complete – upload.csv",
        ),
        (
            "item_failed",
            {"item": {"label": "Mayor – NC", "error": "boom", "failure": 2}},
            "Batch needs re-upload – Mayor – NC – upload.csv",
        ),
        (
            "run_finished",
            {"final": FINAL},
            "Upload completed with 1 batch(es) to re-upload – upload.csv",
        ),
    ],
)
def test_every_kind_renders_subject_text_and_html(
    kind: str, extra: dict[str, Any], subject: str
) -> None:
    rendered = TemplateRenderer([TEMPLATES], tz="America/New_York").render(kind, context(**extra))
    assert rendered.subject == subject
    assert "r1" in rendered.text and rendered.html.startswith("<!doctype html>")


def test_stage_and_final_times_are_shown_in_the_zone_with_its_name() -> None:
    renderer = TemplateRenderer([TEMPLATES], tz="America/New_York")
    text = renderer.render("stage_complete", context(stage=STAGE)).text
    assert "finished at 2025-07-08 09:15:07 EDT (America/New_York)" in text
    final = renderer.render("run_finished", context(final=FINAL)).text
    assert "2025-01-08 08:15:07 EST (America/New_York) – 2025-07-08 09:15:07 EDT" in final
    utc = TemplateRenderer([TEMPLATES], tz="UTC").render("stage_complete", context(stage=STAGE))
    assert "finished at 2025-07-08 13:15:07 UTC:" in utc.text  # no "(UTC)" echo


def test_html_is_autoescaped_and_text_is_not() -> None:
    evil = '<script>alert("x")</script>'
    item = {"label": evil, "error": "<b>bold</b> & co", "failure": 1}
    rendered = TemplateRenderer([TEMPLATES]).render("item_failed", context(item=item))
    assert evil not in rendered.html and "&lt;script&gt;" in rendered.html
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in rendered.html
    assert evil in rendered.text  # plain text is not HTML: nothing to escape


def test_a_users_directory_overrides_templates_by_name(tmp_path: Path) -> None:
    (tmp_path / "run_queued.subject.j2").write_text("Ours: {{ run.name }}", encoding="utf-8")
    renderer = TemplateRenderer([tmp_path, TEMPLATES])
    rendered = renderer.render("run_queued", context())
    assert rendered.subject == "Ours: upload.csv"
    assert "was queued" in rendered.text  # the others are still the app's


def test_a_missing_variable_is_an_error_not_a_blank() -> None:
    with pytest.raises(Exception, match="stage"):
        TemplateRenderer([TEMPLATES]).render("stage_complete", context())
