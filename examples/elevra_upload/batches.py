"""Group candidate rows into one batch per election, split to a size the model can handle.

An election is (contest, election date) — the NC listing repeats a contest once per county it spans
and separately per election date. Template spreadsheets without a date group by (municipality,
state, position, year) like the original (§2.7). Unlike the original, a large group is split into
parts instead of being silently truncated at execution time (D-20), and a candidate listed once per
county is researched once.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import date
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from .ingest import CandidateRow

__all__ = ["DEFAULT_MAX_CANDIDATES", "Batch", "Merged", "group_rows", "normalise_text"]

DEFAULT_MAX_CANDIDATES = 40

_T = TypeVar("_T")


def normalise_text(value: str | None) -> str:
    """Case-, accent-, punctuation- and spacing-insensitive form used for keys and matching."""
    if not value:
        return ""
    text = unicodedata.normalize("NFKD", value.casefold())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = re.sub(r"[^\w\s&/-]", " ", text)
    return " ".join(text.split())


class Merged(BaseModel):
    """A row folded into an earlier row of the same candidate (e.g. listed in a second county)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    row_number: int
    kept_row_number: int
    county: str | None = None


class Batch(BaseModel):
    """One election's candidates (or one part of them), as the queue stores it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str  # stable; "<group_key>#2/3" for a part
    group_key: str  # the election, shared by all its parts
    contest: str  # display value of the first row
    election_date: date | None
    year: int | None
    municipality: str | None
    state: str | None
    city: str | None  # the election's location as the spreadsheet gives it (D-22)
    counties: tuple[str, ...]
    seats: int | None
    term: str | None
    part: int = 1
    parts: int = 1
    candidates: tuple[CandidateRow, ...]
    merged: tuple[Merged, ...] = ()

    def to_payload(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Batch:
        return cls.model_validate(dict(payload))

    @property
    def row_numbers(self) -> tuple[int, ...]:
        """Every input row this batch accounts for, merged duplicates included."""
        rows = [c.row_number for c in self.candidates] + [m.row_number for m in self.merged]
        return tuple(sorted(rows))


def group_rows(
    rows: Iterable[CandidateRow], max_candidates_per_batch: int = DEFAULT_MAX_CANDIDATES
) -> list[Batch]:
    """Batches in a deterministic order with stable keys; every row lands in exactly one batch."""
    if max_candidates_per_batch < 1:
        raise ValueError("max_candidates_per_batch must be at least 1")
    groups: dict[str, list[CandidateRow]] = {}
    sort_keys: dict[str, tuple[str, ...]] = {}
    for row in rows:
        key, sort_key = _group_key(row)
        groups.setdefault(key, []).append(row)
        sort_keys[key] = sort_key
    batches: list[Batch] = []
    for key in sorted(groups, key=lambda k: (sort_keys[k], k)):
        batches.extend(_make_batches(key, groups[key], max_candidates_per_batch))
    return batches


def _group_key(row: CandidateRow) -> tuple[str, tuple[str, ...]]:
    contest = normalise_text(row.position)
    when = row.election_date.isoformat() if row.election_date else f"y{row.year or ''}"
    if row.election_date is None or row.municipality:
        # The template layout: a "School Board" is only an election together with its place.
        place = (normalise_text(row.municipality), normalise_text(row.state))
    else:
        # The NC layout: contest names are unique statewide and `state` is the mailing address.
        place = ("", "")
    parts = (*[p for p in place if p], contest, when)
    return "|".join(parts), (when, *place, contest)


def _make_batches(group_key: str, rows: Sequence[CandidateRow], cap: int) -> list[Batch]:
    candidates, merged = _dedupe(rows)
    first = rows[0]
    common = {
        "group_key": group_key,
        "contest": " ".join(first.position.split()),
        "election_date": first.election_date,
        "year": first.year,
        "municipality": _first(r.municipality for r in rows),
        "state": _most_common(r.state for r in rows),
        "city": _first(r.municipality for r in rows) or _most_common(r.city for r in rows),
        "counties": tuple(dict.fromkeys(r.county for r in rows if r.county)),
        "seats": _first(r.seats for r in rows),
        "term": _first(r.term for r in rows),
    }
    parts = math.ceil(len(candidates) / cap)
    if parts == 1:
        return [Batch(key=group_key, candidates=tuple(candidates), merged=tuple(merged), **common)]
    # Even parts (41 at cap 40 -> 21 + 20) so no part is a lonely straggler.
    size, extra = divmod(len(candidates), parts)
    batches: list[Batch] = []
    start = 0
    for index in range(parts):
        chunk = candidates[start : start + size + (1 if index < extra else 0)]
        start += len(chunk)
        kept = {c.row_number for c in chunk}
        batches.append(
            Batch(
                key=f"{group_key}#{index + 1}/{parts}",
                part=index + 1,
                parts=parts,
                candidates=tuple(chunk),
                merged=tuple(m for m in merged if m.kept_row_number in kept),
                **common,
            )
        )
    return batches


def _dedupe(rows: Sequence[CandidateRow]) -> tuple[list[CandidateRow], list[Merged]]:
    """Same name and same e-mail (or no e-mail on either side) is the same candidate."""
    kept: list[CandidateRow] = []
    by_name: dict[str, list[CandidateRow]] = {}
    merged: list[Merged] = []
    for row in rows:
        name = normalise_text(row.full_name)
        match = next(
            (
                k
                for k in by_name.get(name, [])
                if not k.email or not row.email or k.email == row.email
            ),
            None,
        )
        if match is None:
            kept.append(row)
            by_name.setdefault(name, []).append(row)
        else:
            merged.append(
                Merged(
                    row_number=row.row_number, kept_row_number=match.row_number, county=row.county
                )
            )
    return kept, merged


def _first(values: Iterable[_T | None]) -> _T | None:
    return next((v for v in values if v is not None and v != ""), None)


def _most_common(values: Iterable[str | None]) -> str | None:
    """Most frequent value, compared case-insensitively; shown as first spelt; ties: first seen."""
    counts: Counter[str] = Counter()
    spelling: dict[str, str] = {}
    for value in values:
        if value and value.strip():
            key = normalise_text(value)
            counts[key] += 1
            spelling.setdefault(key, value.strip())
    return spelling[counts.most_common(1)[0][0]] if counts else None
