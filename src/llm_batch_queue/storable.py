"""What every store can keep: JSON without NaN, NUL (PostgreSQL refuses it) or a lone UTF-16
surrogate (no store can encode one as UTF-8; a JSON parser makes one of a "\\ud83d" escape, as
in a model reply cut inside an emoji). Checked before a write, so that one bad value fails its
own job or submission with a reason, not a whole batch at the commit, and so that what passes
on the memory store passes on SQLite and PostgreSQL too."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from llm_batch_queue.jobs import JSON, NewItem

# json.dumps escapes both kinds, so the walk runs only when the text shows one
_ESCAPED_BAD_CHAR = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_SURROGATE = re.compile("[\ud800-\udfff]")


def unstorable(value: object) -> str | None:
    """Why `value` cannot be kept by every store ("cannot be stored as JSON: …"), or None."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        return f"cannot be stored as JSON: {exc}"
    if _ESCAPED_BAD_CHAR.search(text) and (bad := _bad_char(value)) is not None:
        return f"cannot be stored as JSON: it contains {bad}"
    return None


def check_new_run(name: str, meta: JSON, items: Sequence[NewItem]) -> None:
    """ValueError naming the first thing of a new run no store could keep (nothing is written:
    PostgreSQL refused it with a driver error, SQLite and memory took it)."""
    keys = [new.key for new in items]
    if len(set(keys)) != len(keys):  # the SQL store's UNIQUE(run_id, key)
        raise ValueError("item keys must be unique within a run")
    if (why := unstorable(name)) is not None:
        raise ValueError(f"the run's name {why}")
    if (why := unstorable(meta)) is not None:
        raise ValueError(f"the run's meta {why}")
    for new in items:
        if (why := unstorable(new.key)) is not None:
            raise ValueError(f"item key {new.key!r} {why}")
        if (why := unstorable(new.payload)) is not None:
            raise ValueError(f"item {new.key!r}: its payload {why}")


def _bad_char(value: object) -> str | None:
    if isinstance(value, str):
        if "\x00" in value:
            return "U+0000 (NUL)"
        if found := _SURROGATE.search(value):
            return f"a lone surrogate, U+{ord(found.group()):04X}"
        return None
    if isinstance(value, dict):
        return next((bad for k, v in value.items() if (bad := _bad_char(k) or _bad_char(v))), None)
    if isinstance(value, list | tuple):
        return next((bad for v in value if (bad := _bad_char(v))), None)
    return None
