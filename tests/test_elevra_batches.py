"""Grouping rows into per-election batches: duplicates across counties, splitting, stable keys."""

from __future__ import annotations

import csv
import io
import json
import random
from datetime import date
from pathlib import Path

import pytest

from examples.elevra_upload.batches import Batch, group_rows, normalise_text
from examples.elevra_upload.ingest import CandidateRow, read_rows

SAMPLES = Path(__file__).parents[1] / "examples" / "elevra_upload" / "samples"
NC_CSV = Path(__file__).parents[1].parent / "shared" / "data" / "nc_candidates_2025.csv"
NOV = date(2025, 11, 4)


def row(n: int, name: str, contest: str = "Town Council", **extra: object) -> CandidateRow:
    fields = {
        "row_number": n,
        "full_name": name,
        "position": contest,
        "election_date": NOV,
        "year": 2025,
    }
    return CandidateRow.model_validate(fields | extra)


def test_sample_nc_batches() -> None:
    batches = group_rows(read_rows(SAMPLES / "sample_nc.csv").rows)
    by_key = {b.key: b for b in batches}
    assert len(batches) == 11
    burlington = by_key["city of burlington mayor|2025-11-04"]
    assert burlington.counties == ("ALAMANCE", "GUILFORD")
    assert len(burlington.candidates) == 2 and len(burlington.merged) == 2
    assert {m.county for m in burlington.merged} == {"GUILFORD"}
    assert (burlington.city, burlington.state, burlington.seats) == ("BURLINGTON", "NC", 1)
    # The same contest on two dates is two elections.
    assert {b.election_date for b in batches if b.contest == "CITY OF FAYETTEVILLE MAYOR"} == {
        date(2025, 10, 7),
        NOV,
    }


def test_template_groups_by_place_position_and_year() -> None:
    batches = group_rows(read_rows(SAMPLES / "sample_template.csv").rows)
    assert [b.key for b in batches] == [
        "deptford township|new jersey|school board|y2025",
        "ithaca|new york|common council|y2025",
        "ithaca|new york|mayor|y2025",
        "springfield|illinois|city council|y2025",
    ]
    assert batches[0].municipality == batches[0].city == "Deptford Township"
    assert batches[0].state == "New Jersey"


def test_same_position_in_two_municipalities_is_two_elections() -> None:
    rows = [
        row(1, "Ana Lee", "School Board", municipality="Ithaca", state="NY"),
        row(2, "Bo Chen", "School Board", municipality="Dryden", state="NY"),
    ]
    assert len(group_rows(rows)) == 2


def test_duplicate_rules() -> None:
    rows = [
        row(1, "Ana Lee", email="ana@example.org", county="A"),
        row(2, "ANA  LEE", email="ana@example.org", county="B"),  # same person, other county
        row(3, "Ana Lee", email="other@example.org", county="B"),  # a namesake: kept
        row(4, "Bo Chen", county="A"),
        row(5, "Bo Chen", county="B"),  # no e-mail on either side: same name is enough
        row(6, "Cy Diaz", email="cy@example.org", county="A"),
        row(7, "Cy Diaz", county="B"),  # e-mail on one side only
    ]
    (batch,) = group_rows(rows)
    assert [c.row_number for c in batch.candidates] == [1, 3, 4, 6]
    assert [(m.row_number, m.kept_row_number, m.county) for m in batch.merged] == [
        (2, 1, "B"),
        (5, 4, "B"),
        (7, 6, "B"),
    ]
    assert batch.counties == ("A", "B")
    assert batch.row_numbers == tuple(range(1, 8))


def test_large_group_is_split_never_truncated() -> None:
    rows = [row(n, f"Person {n}", county="A") for n in range(1, 96)]
    rows += [row(n, f"Person {n - 95}", county="B") for n in range(96, 101)]  # 5 duplicates
    batches = group_rows(rows, max_candidates_per_batch=40)
    assert [b.key for b in batches] == [f"town council|2025-11-04#{i}/3" for i in (1, 2, 3)]
    assert [len(b.candidates) for b in batches] == [32, 32, 31]
    assert {b.group_key for b in batches} == {"town council|2025-11-04"}
    assert [(b.part, b.parts) for b in batches] == [(1, 3), (2, 3), (3, 3)]
    accounted = [n for b in batches for n in b.row_numbers]
    assert sorted(accounted) == list(range(1, 101))  # every row once: none lost, none twice
    # A merged duplicate travels with the part holding its kept row.
    for b in batches:
        assert {m.kept_row_number for m in b.merged} <= {c.row_number for c in b.candidates}


def test_cap_of_one() -> None:
    batches = group_rows([row(n, f"P{n}") for n in range(1, 4)], max_candidates_per_batch=1)
    assert [len(b.candidates) for b in batches] == [1, 1, 1]
    with pytest.raises(ValueError):
        group_rows([], max_candidates_per_batch=0)


def test_keys_are_stable_and_order_is_deterministic() -> None:
    rows = list(read_rows(SAMPLES / "sample_nc.csv").rows)
    first = [b.to_payload() for b in group_rows(rows)]
    again = [b.to_payload() for b in group_rows(read_rows(SAMPLES / "sample_nc.csv").rows)]
    assert first == again
    random.Random(7).shuffle(rows)
    shuffled = group_rows(rows)
    assert [b.key for b in shuffled] == [p["key"] for p in first]


def test_payload_round_trip_through_json() -> None:
    for batch in group_rows(read_rows(SAMPLES / "sample_nc.csv").rows, max_candidates_per_batch=2):
        payload = json.loads(json.dumps(batch.to_payload()))
        assert Batch.from_payload(payload) == batch


def test_normalise_text() -> None:
    assert normalise_text("  City of  WINSTON-SALEM, Ward #2 ") == "city of winston-salem ward 2"
    assert normalise_text("José  MUÑOZ Jr.") == "jose munoz jr"
    assert normalise_text(None) == ""


@pytest.mark.skipif(not NC_CSV.exists(), reason="shared/data/nc_candidates_2025.csv not present")
def test_real_nc_file() -> None:
    rows = read_rows(NC_CSV).rows
    batches = group_rows(rows)
    # Independently: elections are distinct (contest, date); candidates are distinct
    # (contest, date, name, e-mail) — the listing repeats them once per county.
    records = list(csv.DictReader(io.StringIO(NC_CSV.read_bytes().decode("cp1252"), newline="")))
    elections = {(normalise_text(r["contest_name"]), r["election_dt"]) for r in records}
    people = {
        (
            normalise_text(r["contest_name"]),
            r["election_dt"],
            normalise_text(r["name_on_ballot"]),
            r["email"].lower(),
        )
        for r in records
    }
    assert len(batches) == len(elections) == 988
    assert sum(len(b.candidates) for b in batches) == len(people) == 2832
    assert sum(len(b.merged) for b in batches) == 3120 - 2832
    assert max(len(b.candidates) for b in batches) == 15
    assert sorted(n for b in batches for n in b.row_numbers) == list(range(1, 3121))
    split = group_rows(rows, max_candidates_per_batch=5)
    assert sorted(n for b in split for n in b.row_numbers) == list(range(1, 3121))
    assert max(len(b.candidates) for b in split) == 5
