"""The checks every adapter applies to a model's reply before handing it to a stage."""

from __future__ import annotations

import json
from typing import Any

from llm_batch_queue.errors import InvalidOutput


def checked_output(
    text: str | None, *, wants_json: bool, finish_reason: str | None, status_code: int = 200
) -> tuple[str, Any]:
    """Raise InvalidOutput for empty, truncated-JSON or unparseable-JSON replies.

    Returns the text and, when JSON was asked for, its decoded value (else None). Schema
    validation is left to the stage, which owns the output type.
    """
    if text is None or not text.strip():
        raise InvalidOutput(
            f"empty output (finish reason {finish_reason})", status_code=status_code
        )
    if not wants_json:
        return text, None
    if finish_reason == "MAX_TOKENS":
        raise InvalidOutput("JSON output cut off at max_output_tokens", status_code=status_code)
    try:
        return text, json.loads(text)
    except ValueError as exc:
        raise InvalidOutput(f"output is not valid JSON: {exc}", status_code=status_code) from exc
