"""The insert stage on SQLite and PostgreSQL: one transaction per batch, idempotent upserts."""

from __future__ import annotations

import csv
import io
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import StaticPool

from examples.elevra_upload import store
from examples.elevra_upload.batches import Batch, group_rows, normalise_text
from examples.elevra_upload.ingest import read_rows
from examples.elevra_upload.prompts import render_analyze, render_structure
from examples.elevra_upload.responder import respond
from examples.elevra_upload.schema import StructuredOutput, parse_structured

SAMPLES = Path(__file__).parents[1] / "examples" / "elevra_upload" / "samples"
NC_CSV = Path(__file__).parents[1].parent / "shared" / "data" / "nc_candidates_2025.csv"
PG_URL = os.environ.get("LBQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
UPLOADER = "admin@example.org"


@pytest.fixture(scope="module")
def pg_server() -> Iterator[Engine]:
    """A uniquely named database for this module, dropped afterwards; skip if there is no server."""
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect():
            pass
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc.orig}")
    name = f"elevra_store_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = create_engine(make_url(PG_URL).set(database=name))
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    if request.param == "sqlite":
        db = create_engine("sqlite://", poolclass=StaticPool)
    else:
        db = request.getfixturevalue("pg_server")
        store.metadata.drop_all(db)
    store.create_tables(db)
    yield db
    if request.param == "sqlite":
        db.dispose()


def simulate(batch: Batch) -> StructuredOutput:
    """Both model steps, answered by the offline responder."""
    analysis = respond("sim", render_analyze(batch), False)
    return parse_structured(respond("sim", render_structure(batch, analysis), True))


def counts(engine: Engine) -> tuple[int, int, int]:
    with engine.connect() as conn:
        tables = (store.elections, store.candidates, store.election_links)
        elections, candidates, links = (
            conn.scalar(select(func.count()).select_from(t)) or 0 for t in tables
        )
    return elections, candidates, links


def insert_file(engine: Engine, path: Path, cap: int = 40) -> list[store.InsertResult]:
    batches = group_rows(read_rows(path).rows, max_candidates_per_batch=cap)
    return [store.insert_batch(engine, simulate(b), b, UPLOADER, hidden=True) for b in batches]


def test_sample_twice_and_reuploaded_creates_no_duplicates(engine: Engine) -> None:
    first = insert_file(engine, SAMPLES / "sample_nc.csv")
    after_first = counts(engine)
    # 41 rows: 11 elections; 39 (election, person) entries once Burlington's second county is
    # merged; the two Fayetteville finalists stand on both dates, so 37 people.
    assert after_first == (11, 37, 39)
    assert all(r.election_created for r in first)
    assert sum(c.created for r in first for c in r.candidates) == 37
    assert all(r.missing == () and r.notes == () for r in first)
    again = insert_file(engine, SAMPLES / "sample_nc.csv")  # a retry or a re-upload
    assert counts(engine) == after_first
    assert not any(r.election_created for r in again)
    assert not any(c.created or c.linked for r in again for c in r.candidates)
    assert [r.election_id for r in again] == [r.election_id for r in first]
    # A different split of the same file maps onto the same rows too.
    insert_file(engine, SAMPLES / "sample_nc.csv", cap=2)
    assert counts(engine) == after_first


def test_same_person_in_two_elections_is_one_candidate(engine: Engine) -> None:
    results = insert_file(engine, SAMPLES / "sample_nc.csv")
    fayetteville = [r for r in results if r.batch_key.startswith("city of fayetteville mayor")]
    primary, general = fayetteville
    assert {c.slug for c in general.candidates} <= {c.slug for c in primary.candidates}
    assert all(not c.created and c.linked for c in general.candidates)


def test_location_and_contact_come_from_the_spreadsheet(engine: Engine) -> None:
    batch = group_rows(read_rows(SAMPLES / "sample_template.csv").rows)[0]
    structured = simulate(batch)
    entry = structured.elections[0]
    moved = entry.election.model_copy(
        update={"city": "Paris", "state": "Texas", "date": "11/04/2025"}
    )
    people = [c.model_copy(update={"email": "invented@example.com"}) for c in entry.candidates]
    tampered = StructuredOutput.model_validate(
        {
            "elections": [
                {"election": moved.model_dump(), "candidates": [p.model_dump() for p in people]}
            ]
        }
    )
    result = store.insert_batch(engine, tampered, batch, UPLOADER, hidden=False)
    with engine.connect() as conn:
        row = conn.execute(select(store.elections)).one()
        emails = set(conn.scalars(select(store.candidates.c.email)))
    assert (row.city, row.state, row.contest) == ("Deptford Township", "New Jersey", "School Board")
    assert row.date == date(
        2025, 11, 4
    )  # the spreadsheet had only a year: the model's date fills it
    assert row.hidden is False and row.uploaded_by == UPLOADER
    assert emails == {c.email for c in batch.candidates}
    assert "invented@example.com" not in {c.email for c in result.candidates}


def test_unknown_people_are_ignored_and_dropped_rows_reported(engine: Engine) -> None:
    batch = group_rows(read_rows(SAMPLES / "sample_template.csv").rows)[0]
    entry = simulate(batch).elections[0]
    stranger = entry.candidates[0].model_copy(update={"name": "Ima Stranger", "email": None})
    kept = entry.candidates[1:]  # the model dropped the first candidate and invented one
    structured = StructuredOutput.model_validate(
        {
            "elections": [
                {
                    "election": entry.election.model_dump(),
                    "candidates": [c.model_dump() for c in [*kept, stranger]],
                }
            ]
        }
    )
    result = store.insert_batch(engine, structured, batch, UPLOADER, hidden=True)
    assert result.notes == ("ignored 'Ima Stranger': not a candidate of this batch",)
    assert [(m.row_number, m.name) for m in result.missing] == [(1, "Alice Harrowgate")]
    assert len(result.candidates) == len(batch.candidates) - 1
    assert counts(engine)[1] == len(batch.candidates) - 1


def test_model_names_are_matched_by_variant_or_email(engine: Engine) -> None:
    batch = group_rows(read_rows(SAMPLES / "sample_nc.csv").rows)[0]
    entry = simulate(batch).elections[0]
    renamed = [
        c.model_copy(update={"name": f"Candidate {i}"}) if c.email else c
        for i, c in enumerate(entry.candidates)
    ]
    structured = StructuredOutput(elections=[entry.model_copy(update={"candidates": renamed})])
    result = store.insert_batch(engine, structured, batch, UPLOADER, hidden=True)
    assert result.missing == () and len(result.candidates) == len(batch.candidates)


def test_one_transaction_joins_the_callers(engine: Engine) -> None:
    batch = group_rows(read_rows(SAMPLES / "sample_template.csv").rows)[0]
    with engine.connect() as conn:
        transaction = conn.begin()
        store.insert_batch(conn, simulate(batch), batch, UPLOADER, hidden=True)
        assert conn.scalar(select(func.count()).select_from(store.candidates)) == 4
        transaction.rollback()  # the caller's failure undoes every row of the batch
    assert counts(engine) == (0, 0, 0)
    with engine.connect() as conn:  # no transaction open: insert_batch commits its own
        store.insert_batch(conn, simulate(batch), batch, UPLOADER, hidden=True)
    assert counts(engine) == (1, 4, 4)


def test_empty_structured_output_is_an_insert_error(engine: Engine) -> None:
    batch = group_rows(read_rows(SAMPLES / "sample_template.csv").rows)[0]
    with pytest.raises(store.InsertError, match="no election"):
        store.insert_batch(engine, StructuredOutput(elections=[]), batch, UPLOADER, hidden=True)
    assert counts(engine) == (0, 0, 0)


def test_insert_result_round_trips_as_json(engine: Engine) -> None:
    (result, *_) = insert_file(engine, SAMPLES / "sample_template.csv")
    assert store.InsertResult.from_payload(result.to_payload()) == result


@pytest.mark.postgres
def test_concurrent_runs_of_the_same_upload(pg_server: Engine) -> None:
    """Every batch run twice at once (a duplicated job, a stale lease) adds nothing twice."""
    store.metadata.drop_all(pg_server)
    store.create_tables(pg_server)
    batches = group_rows(read_rows(SAMPLES / "sample_nc.csv").rows, max_candidates_per_batch=3)
    work = [(simulate(b), b) for b in batches] * 2
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(
            pool.map(
                lambda job: store.insert_batch(pg_server, job[0], job[1], UPLOADER, True), work
            )
        )
    assert counts(pg_server) == (11, 37, 39)
    assert sum(c.created for r in results for c in r.candidates) >= 37


def test_candidate_slug() -> None:
    slug = store.candidate_slug("José Muñoz Jr.", "jose@example.org", "NC")
    assert slug.startswith("jose-munoz-jr-") and len(slug) == len("jose-munoz-jr-") + 8
    assert store.candidate_slug("JOSÉ  MUÑOZ JR", "jose@example.org", None) == slug
    assert store.candidate_slug("José Muñoz Jr.", None, "NC") != slug
    assert store.candidate_slug("!!!", None, None).startswith("candidate-")


@pytest.mark.skipif(not NC_CSV.exists(), reason="shared/data/nc_candidates_2025.csv not present")
def test_real_nc_file_twice(engine: Engine) -> None:
    records = list(csv.DictReader(io.StringIO(NC_CSV.read_bytes().decode("cp1252"), newline="")))
    elections = {(normalise_text(r["contest_name"]), r["election_dt"]) for r in records}
    entries = {
        (
            normalise_text(r["contest_name"]),
            r["election_dt"],
            normalise_text(r["name_on_ballot"]),
            r["email"],
        )
        for r in records
    }
    batches = group_rows(read_rows(NC_CSV).rows)
    structured = [simulate(b) for b in batches]
    for _ in range(2):
        results = [
            store.insert_batch(engine, s, b, UPLOADER, hidden=True)
            for s, b in zip(structured, batches, strict=True)
        ]
        assert all(r.missing == () for r in results)
        elections_n, candidates_n, links_n = counts(engine)
        assert (elections_n, links_n) == (len(elections), len(entries)) == (988, 2832)
        assert candidates_n == 2720  # people standing in several elections are one candidate
