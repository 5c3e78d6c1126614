"""Render the analyze and structure prompts for a batch.

Prompt-injection hygiene (D-25): no spreadsheet or model text is interpolated into the instructions.
It goes into JSON data blocks, each between a begin line and an end line, and the instructions say
the blocks are data. ``<`` and ``>`` are escaped inside the JSON, so a cell can never contain a
marker, and JSON strings cannot contain a raw newline, so nothing can start a line inside a block.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jinja2

from .batches import Batch
from .schema import Analysis

__all__ = [
    "ANALYSIS_BEGIN",
    "ANALYSIS_END",
    "ANALYZE_MARKER",
    "ROWS_BEGIN",
    "ROWS_END",
    "STRUCTURE_MARKER",
    "batch_data",
    "extract_block",
    "prompt_kind",
    "render_analyze",
    "render_structure",
]

TEMPLATES = Path(__file__).with_name("prompts")
# The first line of each template: it tells the offline responder which step a prompt is for.
ANALYZE_MARKER = "elevra-upload/analyze v1"
STRUCTURE_MARKER = "elevra-upload/structure v1"
ROWS_BEGIN, ROWS_END = "<<<ROWS_JSON", "ROWS_JSON>>>"
ANALYSIS_BEGIN, ANALYSIS_END = "<<<ANALYSIS_JSON", "ANALYSIS_JSON>>>"


@functools.cache
def _environment() -> jinja2.Environment:
    # Prompts are not HTML: autoescape off. StrictUndefined: a typo fails loudly, not as "".
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def batch_data(batch: Batch) -> dict[str, Any]:
    """What the model sees of a batch: the election and its candidates, without street addresses."""
    counties: dict[int, list[str]] = {
        c.row_number: [c.county] if c.county else [] for c in batch.candidates
    }
    for merged in batch.merged:
        if merged.county and merged.county not in counties[merged.kept_row_number]:
            counties[merged.kept_row_number].append(merged.county)
    election = {
        "contest": batch.contest,
        "election_date": batch.election_date.strftime("%m/%d/%Y") if batch.election_date else None,
        "year": batch.year,
        "municipality": batch.municipality,
        "city": batch.city,
        "state": batch.state,
        "counties": list(batch.counties),
        "seats": batch.seats,
        "term": batch.term,
    }
    candidates = [
        {
            "row_number": row.row_number,
            "name": row.full_name,
            "first_name": row.first_name,
            "last_name": row.last_name,
            "email": row.email,
            "phone": row.phone,
            "party": row.party,
            "home_city": row.city,
            "home_state": row.state,
            "counties": counties[row.row_number],
            "district": row.district,
            "status": row.status,
        }
        for row in batch.candidates
    ]
    return {"election": election, "candidates": candidates}


def render_analyze(batch: Batch) -> str:
    return (
        _environment()
        .get_template("analyze.md.j2")
        .render(
            marker=ANALYZE_MARKER,
            part=batch.part,
            parts=batch.parts,
            rows_begin=ROWS_BEGIN,
            rows_end=ROWS_END,
            rows_json=_data_json(batch_data(batch)),
        )
    )


def render_structure(
    batch: Batch, analysis: Analysis | Mapping[str, Any] | Sequence[Any] | str
) -> str:
    """``analysis`` is the analyze step's output: parsed JSON, or its raw text."""
    if isinstance(analysis, Analysis):
        notes: Any = analysis.model_dump(mode="json")
    elif isinstance(analysis, str):
        try:
            notes = json.loads(analysis)
        except ValueError:
            notes = analysis  # kept as one JSON string: still inside the data block
    elif isinstance(analysis, Mapping):
        notes = dict(analysis)
    else:
        notes = list(analysis)
    return (
        _environment()
        .get_template("structure.md.j2")
        .render(
            marker=STRUCTURE_MARKER,
            rows_begin=ROWS_BEGIN,
            rows_end=ROWS_END,
            rows_json=_data_json(batch_data(batch)),
            analysis_begin=ANALYSIS_BEGIN,
            analysis_end=ANALYSIS_END,
            analysis_json=_data_json(notes),
        )
    )


def prompt_kind(prompt: str) -> Literal["analyze", "structure"] | None:
    first_line = prompt.lstrip().partition("\n")[0].strip()
    if first_line == ANALYZE_MARKER:
        return "analyze"
    if first_line == STRUCTURE_MARKER:
        return "structure"
    return None


def extract_block(prompt: str, begin: str, end: str) -> Any:
    """Parse the JSON between a line equal to ``begin`` and the next line equal to ``end``."""
    lines = prompt.splitlines()
    try:
        start = lines.index(begin) + 1
        stop = lines.index(end, start)
    except ValueError:
        raise ValueError(f"prompt has no {begin} … {end} block") from None
    return json.loads("\n".join(lines[start:stop]))


def _data_json(value: Any) -> str:
    """JSON with one top-level key per line and one list item (a candidate) per line."""
    if isinstance(value, dict) and value:
        lines = [f"{json.dumps(k)}: {_list_json(v)}" for k, v in value.items()]
        text = "{\n" + ",\n".join(lines) + "\n}"
    else:
        text = _list_json(value)
    # Only string contents can hold < or >, and \u003c/\u003e are the same characters to a reader.
    return text.replace("<", "\\u003c").replace(">", "\\u003e")


def _list_json(value: Any) -> str:
    if isinstance(value, list) and value:
        return "[\n" + ",\n".join(json.dumps(v, ensure_ascii=False) for v in value) + "\n]"
    return json.dumps(value, ensure_ascii=False)
