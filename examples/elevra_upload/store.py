"""The app's election tables and the insert stage.

The original insert created a new election and new candidates on every run, outside any transaction
(D-9). Here one batch is one transaction of upserts on natural keys, so re-running a batch or
re-uploading a file changes nothing that is already there:

- an election is identified by the spreadsheet's contest, date (or year) and place, never by what
  the model wrote, and its city/state always come from the spreadsheet (D-22);
- a candidate is identified by a slug made from the spreadsheet name plus e-mail (or state when the
  row has no e-mail), so the same person is one row across elections and re-uploads.

The model's candidates are matched to the batch's rows: unknown people are ignored with a note and
rows the model dropped are reported as missing, so nobody disappears silently.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    Date,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from .batches import Batch, normalise_text
from .ingest import CandidateRow
from .schema import CandidateOut, StructuredOutput

__all__ = [
    "InsertError",
    "InsertResult",
    "InsertedCandidate",
    "MissingCandidate",
    "candidate_slug",
    "candidates",
    "create_tables",
    "election_links",
    "election_natural_key",
    "elections",
    "insert_batch",
    "metadata",
]

metadata = MetaData()

elections = Table(
    "elevra_elections",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("natural_key", String(512), nullable=False, unique=True),
    Column("title", Text, nullable=False),
    Column("contest", Text, nullable=False),  # as in the spreadsheet
    Column("date", Date),
    Column("year", Integer),
    Column("city", Text),
    Column("state", Text),
    Column("counties", Text),
    Column("type", String(16), nullable=False),
    Column("seats", Integer),
    Column("term", Text),
    Column("description", Text),
    Column("hidden", Boolean, nullable=False),
    Column("uploaded_by", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

candidates = Table(
    "elevra_candidates",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("slug", String(200), nullable=False, unique=True),
    Column("name", Text, nullable=False),
    Column("email", Text, index=True),
    Column("phone", Text),
    Column("party", Text),
    Column("current_role", Text),
    Column("bio", Text),
    Column("website", Text),
    Column("linkedin", Text),
    Column("image_url", Text),
    Column("home_city", Text),
    Column("home_state", Text),
    Column("hidden", Boolean, nullable=False),
    Column("uploaded_by", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

election_links = Table(
    "elevra_election_links",
    metadata,
    Column(
        "candidate_id",
        Integer,
        ForeignKey("elevra_candidates.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column(
        "election_id",
        Integer,
        ForeignKey("elevra_elections.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("party", Text),
    Column("policies", JSON, nullable=False),
    Column("sources", JSON, nullable=False),
    Column("notes", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Columns a later run may fill or refresh (a new non-null value wins, null keeps the old one).
# Identity, visibility and provenance (slug, name, hidden, uploaded_by, created_at) never change.
_ELECTION_REFRESH = (
    "title",
    "date",
    "city",
    "state",
    "counties",
    "type",
    "seats",
    "term",
    "description",
)
_CANDIDATE_REFRESH = (
    "email",
    "phone",
    "party",
    "current_role",
    "bio",
    "website",
    "linkedin",
    "image_url",
    "home_city",
    "home_state",
)
_LINK_REFRESH = ("party", "policies", "sources", "notes")
_UPSERT_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "elevra_elections": (("natural_key",), _ELECTION_REFRESH),
    "elevra_candidates": (("slug",), _CANDIDATE_REFRESH),
    "elevra_election_links": (("candidate_id", "election_id"), _LINK_REFRESH),
}


class InsertError(ValueError):
    """The structured output cannot be inserted at all (the structure step must be redone)."""


class InsertedCandidate(BaseModel):
    model_config = ConfigDict(frozen=True)

    row_number: int
    name: str
    slug: str
    email: str | None
    election_id: int
    created: bool  # False: the candidate was already present (earlier run, upload or election)
    linked: bool  # False: already linked to this election


class MissingCandidate(BaseModel):
    model_config = ConfigDict(frozen=True)

    row_number: int
    name: str
    email: str | None
    reason: str


class InsertResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    batch_key: str
    election_id: int
    election_created: bool
    candidates: tuple[InsertedCandidate, ...]
    missing: tuple[MissingCandidate, ...]
    notes: tuple[str, ...] = ()

    def to_payload(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> InsertResult:
        return cls.model_validate(dict(payload))


def create_tables(engine: Engine | Connection) -> None:
    metadata.create_all(engine)


def election_natural_key(batch: Batch) -> str:
    """Spreadsheet-only identity: the same file always maps to the same elections."""
    return f"{batch.group_key}|{normalise_text(batch.state)}"[:512]


def candidate_slug(name: str, email: str | None, state: str | None) -> str:
    """``jane-q-public-1a2b3c4d``: readable part from the name, hash of name + (e-mail or state)."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    base = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:80].rstrip("-") or "candidate"
    identity = f"{normalise_text(name)}|{email or normalise_text(state)}"
    return f"{base}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def insert_batch(
    bind: Engine | Connection,
    structured: StructuredOutput,
    batch: Batch,
    uploaded_by: str,
    hidden: bool,
    *,
    now: datetime | None = None,
) -> InsertResult:
    """Upsert the batch's election, candidates and links in one transaction.

    With an Engine, a transaction is opened and committed here. With a Connection already in a
    transaction, the work joins it and the caller commits (so a queue can commit the insert together
    with the job's completion); otherwise one is begun and committed on the connection.
    """
    if not structured.elections:
        raise InsertError(f"batch {batch.key}: the structured output has no election")
    if isinstance(bind, Engine):
        with bind.begin() as connection:
            return _insert(connection, structured, batch, uploaded_by, hidden, now)
    if bind.in_transaction():
        return _insert(bind, structured, batch, uploaded_by, hidden, now)
    with bind.begin():
        return _insert(bind, structured, batch, uploaded_by, hidden, now)


def _insert(
    conn: Connection,
    structured: StructuredOutput,
    batch: Batch,
    uploaded_by: str,
    hidden: bool,
    now: datetime | None,
) -> InsertResult:
    now = now or datetime.now(UTC)
    notes: list[str] = []
    matches, unmatched_rows = _match(batch, structured, notes)
    election_id, election_created = _upsert_election(
        conn, structured, batch, uploaded_by, hidden, now
    )

    slugs = {
        row.row_number: candidate_slug(row.full_name, row.email, row.state) for row, _ in matches
    }
    existing = set(
        conn.scalars(select(candidates.c.slug).where(candidates.c.slug.in_(slugs.values())))
    )
    ids: dict[int, int] = {}
    # Slug order: concurrent batches sharing people lock their rows in one order (no deadlock).
    for row, out in sorted(matches, key=lambda match: slugs[match[0].row_number]):
        values = _candidate_values(row, out) | {
            "slug": slugs[row.row_number],
            "name": row.full_name,
            "hidden": hidden,
            "uploaded_by": uploaded_by,
            "created_at": now,
            "updated_at": now,
        }
        ids[row.row_number] = _upsert_id(conn, candidates, values)
    linked_before = set(
        conn.scalars(
            select(election_links.c.candidate_id).where(
                election_links.c.election_id == election_id,
                election_links.c.candidate_id.in_(ids.values()),
            )
        )
    )
    # Keyed by candidate: one upsert may not touch the same row twice (PostgreSQL refuses).
    links = {
        ids[row.row_number]: {
            "candidate_id": ids[row.row_number],
            "election_id": election_id,
            "party": row.party or _clean(out.party),
            "policies": list(out.key_policies),
            "sources": list(out.sources),
            "notes": _clean(out.additional_notes),
            "created_at": now,
            "updated_at": now,
        }
        for row, out in matches
    }
    if links:
        conn.execute(
            _upsert_statement(conn.dialect.name, election_links.name), list(links.values())
        )
    inserted = [
        InsertedCandidate(
            row_number=row.row_number,
            name=row.full_name,
            slug=slugs[row.row_number],
            email=row.email,
            election_id=election_id,
            created=slugs[row.row_number] not in existing,
            linked=ids[row.row_number] not in linked_before,
        )
        for row, _ in matches
    ]
    missing = tuple(
        MissingCandidate(
            row_number=row.row_number,
            name=row.full_name,
            email=row.email,
            reason="not in the model's structured output",
        )
        for row in unmatched_rows
    )
    return InsertResult(
        batch_key=batch.key,
        election_id=election_id,
        election_created=election_created,
        candidates=tuple(inserted),
        missing=missing,
        notes=tuple(notes),
    )


def _match(
    batch: Batch, structured: StructuredOutput, notes: list[str]
) -> tuple[list[tuple[CandidateRow, CandidateOut]], list[CandidateRow]]:
    """Pair the model's candidates with the batch's rows: by name, else by e-mail."""
    if len(structured.elections) > 1:
        notes.append(
            f"the model returned {len(structured.elections)} elections; candidates of all were used"
        )
    by_email: dict[str, CandidateRow] = {}
    by_name: dict[str, list[CandidateRow]] = {}
    for row in batch.candidates:
        if row.email:
            by_email.setdefault(row.email, row)
        for key in _name_keys(row):
            by_name.setdefault(key, []).append(row)
    taken: set[int] = set()
    matches: list[tuple[CandidateRow, CandidateOut]] = []
    for entry in structured.elections:
        for out in entry.candidates:
            options = by_name.get(normalise_text(out.name), [])
            found = next((r for r in options if r.row_number not in taken), None)
            if found is None:  # a name spelt differently: the spreadsheet's e-mail still pins it
                found = by_email.get((out.email or "").strip().lower())
            if found is None or found.row_number in taken:
                notes.append(f"ignored {out.name!r}: not a candidate of this batch")
                continue
            taken.add(found.row_number)
            matches.append((found, out))
    unmatched = [row for row in batch.candidates if row.row_number not in taken]
    return matches, unmatched


def _name_keys(row: CandidateRow) -> set[str]:
    variants = [
        row.full_name,
        f"{row.first_name or ''} {row.last_name or ''}",
        f"{row.first_name or ''} {row.middle_name or ''} {row.last_name or ''}",
        f"{row.nickname or ''} {row.last_name or ''}",
    ]
    return {key for key in map(normalise_text, variants) if key}


def _upsert_election(
    conn: Connection,
    structured: StructuredOutput,
    batch: Batch,
    uploaded_by: str,
    hidden: bool,
    now: datetime,
) -> tuple[int, bool]:
    model = structured.elections[0].election
    key = election_natural_key(batch)
    existed = conn.scalar(select(elections.c.id).where(elections.c.natural_key == key)) is not None
    values = {
        "natural_key": key,
        "title": model.title.strip() or batch.contest,
        "contest": batch.contest,
        "date": batch.election_date or model.parsed_date(),
        "year": batch.year or (d.year if (d := model.parsed_date()) else None),
        "city": batch.city,  # the spreadsheet's place, never the model's (D-22)
        "state": batch.state,
        "counties": ", ".join(batch.counties) or None,
        "type": model.type,
        "seats": batch.seats or model.number_of_seats,
        "term": batch.term,
        "description": model.description,
        "hidden": hidden,
        "uploaded_by": uploaded_by,
        "created_at": now,
        "updated_at": now,
    }
    election_id = _upsert_id(conn, elections, values)
    return election_id, not existed


def _candidate_values(row: CandidateRow, out: CandidateOut) -> dict[str, Any]:
    # Contact details come from the spreadsheet only: a model must not supply an e-mail (D-21).
    return {
        "email": row.email,
        "phone": row.phone,
        "party": row.party or _clean(out.party),
        "current_role": _clean(out.current_role),
        "bio": _clean(out.bio),
        "website": _clean(out.campaign_website_url),
        "linkedin": _clean(out.linkedin_url),
        "image_url": _clean(out.image_url),
        "home_city": _clean(out.home_city) or row.city,
        "home_state": _clean(out.hometown_state) or row.state,
    }


def _clean(value: str | None) -> str | None:
    """Blank and "N/A"-like placeholders are unknowns, stored as NULL."""
    if value is None:
        return None
    text = value.strip()
    return None if text.casefold() in {"", "n/a", "na", "null", "none", "unknown"} else text


def _upsert_id(conn: Connection, table: Table, values: dict[str, Any]) -> int:
    """Upsert one row and return its id, whether it was inserted or already there."""
    result: int = conn.execute(
        _upsert_statement(conn.dialect.name, table.name), values
    ).scalar_one()
    return result


@functools.cache
def _upsert_statement(dialect: str, table_name: str) -> Any:
    """INSERT … ON CONFLICT DO UPDATE for SQLite or PostgreSQL, built once per dialect and table.

    Values are bound at execution, so SQLAlchemy's compiled cache is reused (building the statement
    per row cost more than running it). Refreshable columns take the new value unless it is NULL.
    """
    table = metadata.tables[table_name]
    conflict, refresh = _UPSERT_KEYS[table_name]
    if dialect == "postgresql":
        pg = postgresql.insert(table)
        stmt: Any = pg
        excluded = pg.excluded
    elif dialect == "sqlite":
        lite = sqlite.insert(table)
        stmt = lite
        excluded = lite.excluded
    else:
        raise NotImplementedError(f"insert_batch supports SQLite and PostgreSQL, not {dialect}")
    set_: dict[str, Any] = {name: func.coalesce(excluded[name], table.c[name]) for name in refresh}
    set_["updated_at"] = excluded["updated_at"]
    stmt = stmt.on_conflict_do_update(index_elements=list(conflict), set_=set_)
    return stmt.returning(table.c.id) if "id" in table.c else stmt
