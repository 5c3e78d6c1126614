"""The spreadsheet reader: encodings, header aliases, clear errors, the real NC listing."""

from __future__ import annotations

import csv
import io
from datetime import date, datetime
from pathlib import Path

import openpyxl
import pytest

from examples.elevra_upload.ingest import IngestError, parse_date, read_rows

SAMPLES = Path(__file__).parents[1] / "examples" / "elevra_upload" / "samples"
NC_CSV = Path(__file__).parents[1].parent / "shared" / "data" / "nc_candidates_2025.csv"
TEMPLATE_HEADER = "FirstName,LastName,Email,Municipality,State,Position,Year\n"


def write(tmp_path: Path, data: bytes | str, name: str = "upload.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


# --- encodings ----------------------------------------------------------------------------------


def test_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, TEMPLATE_HEADER + "José,Muñoz,J@Example.org,Ithaca,NY,Mayor,2025\n")
    result = read_rows(path)
    (row,) = result.rows
    assert (row.first_name, row.last_name, row.email) == ("José", "Muñoz", "j@example.org")
    assert result.encoding == "utf-8"
    assert result.warnings == ()


def test_utf8_bom_does_not_hide_the_first_column(tmp_path: Path) -> None:
    data = b"\xef\xbb\xbf" + (TEMPLATE_HEADER + "Ana,Lee,,Ithaca,NY,Mayor,2025\n").encode()
    result = read_rows(write(tmp_path, data))
    assert result.encoding == "utf-8-sig"
    assert result.rows[0].first_name == "Ana"
    assert "FirstName" in result.mapping


def test_utf16_with_bom(tmp_path: Path) -> None:
    data = (TEMPLATE_HEADER + "Zoë,Lee,,Ithaca,NY,Mayor,2025\n").encode("utf-16")
    assert read_rows(write(tmp_path, data)).rows[0].first_name == "Zoë"


def test_stray_cp1252_byte_keeps_its_row_and_the_real_utf8(tmp_path: Path) -> None:
    data = (
        TEMPLATE_HEADER.encode()
        + "Renée,Lee,,Ithaca,NY,Mayor,2025\n".encode()
        + b"Tom,Ash \xab Oak,,Ithaca,NY,Mayor,2025\n"  # 0xAB alone is not UTF-8
        + b"Ida,Moss,,Ithaca,NY,Mayor,2025\n"
    )
    result = read_rows(write(tmp_path, data))
    assert [r.last_name for r in result.rows] == ["Lee", "Ash « Oak", "Moss"]
    assert result.rows[0].first_name == "Renée"  # the UTF-8 lines were not re-read as cp1252
    assert [str(w) for w in result.warnings] == [
        "row 2: bytes that are not valid UTF-8 were read as cp1252"
    ]


def test_undecodable_byte_is_replaced_not_dropped(tmp_path: Path) -> None:
    data = TEMPLATE_HEADER.encode() + b"Tom,Ash\x81,,Ithaca,NY,Mayor,2025\n"  # 0x81: not cp1252
    result = read_rows(write(tmp_path, data))
    assert result.rows[0].last_name == "Ash\ufffd"
    assert result.warnings[0].row_number == 1


def test_latin1_file(tmp_path: Path) -> None:
    text = (
        TEMPLATE_HEADER + "José,Muñoz,,Ithaca,NY,Mayor,2025\nFrançois,Öberg,,Ithaca,NY,Mayor,2025\n"
    )
    result = read_rows(write(tmp_path, text.encode("latin-1")))
    # charset-normalizer would guess cp1250 here and turn ñ into ń; cp1252 reads Latin-1 letters.
    assert [(r.first_name, r.last_name) for r in result.rows] == [
        ("José", "Muñoz"),
        ("François", "Öberg"),
    ]
    assert result.encoding == "cp1252"
    assert "rows 1, 2" in str(result.warnings[0])


# --- header mapping -----------------------------------------------------------------------------


def test_template_layout_and_ignored_columns(tmp_path: Path) -> None:
    text = (
        "FirstName,LastName,Email,Municipality,State,Position,Year,election_link,CandidateLink\n"
        "Ana,Lee, ANA@EXAMPLE.ORG ,Deptford Township,New Jersey,School Board,2025,,https://x\n"
    )
    result = read_rows(write(tmp_path, text))
    row = result.rows[0]
    assert (row.full_name, row.email, row.municipality, row.state) == (
        "Ana Lee",
        "ana@example.org",
        "Deptford Township",
        "New Jersey",
    )
    assert (row.position, row.year, row.election_date) == ("School Board", 2025, None)
    assert result.ignored_columns == ("election_link", "CandidateLink")
    assert row.raw["CandidateLink"] == "https://x"


def test_empty_position_column_does_not_blank_office(tmp_path: Path) -> None:
    # D-24: the original let a later empty "Position" cell overwrite "Office".
    text = "Name,Office,Position\nAna Lee,Mayor,\nBo Chen,,Council\n"
    rows = read_rows(write(tmp_path, text)).rows
    assert [(r.full_name, r.position) for r in rows] == [
        ("Ana Lee", "Mayor"),
        ("Bo Chen", "Council"),
    ]


def test_name_column_alone_is_split(tmp_path: Path) -> None:
    row = read_rows(write(tmp_path, "name,race\nMary Kate O'Neil,Mayor\n")).rows[0]
    assert (row.first_name, row.last_name, row.full_name) == (
        "Mary",
        "Kate O'Neil",
        "Mary Kate O'Neil",
    )


def test_headers_are_case_space_underscore_insensitive(tmp_path: Path) -> None:
    text = (
        "first name,LAST_NAME,E-mail,Contest Name,Election DT,Vote For\n"
        "Ana,Lee,a@example.org,Mayor,11/04/2025,1\n"
    )
    row = read_rows(write(tmp_path, text)).rows[0]
    assert (row.full_name, row.email, row.position, row.election_date, row.seats) == (
        "Ana Lee",
        "a@example.org",
        "Mayor",
        date(2025, 11, 4),
        1,
    )


def test_semicolon_delimited(tmp_path: Path) -> None:
    rows = read_rows(write(tmp_path, "Name;Position\nAna Lee;Mayor\n")).rows
    assert rows[0].position == "Mayor"


def test_formula_like_cells_are_plain_data(tmp_path: Path) -> None:
    text = (
        'Name,Position,Party\n"=HYPERLINK(""http://x"",""y"")",Mayor,@SUM(1)\n+Ana -Lee,-Council,\n'
    )
    rows = read_rows(write(tmp_path, text)).rows
    assert rows[0].full_name == '=HYPERLINK("http://x","y")'
    assert rows[0].party == "@SUM(1)"
    assert (rows[1].full_name, rows[1].position) == ("+Ana -Lee", "-Council")


# --- rows ---------------------------------------------------------------------------------------


def test_impossible_date_is_a_row_error_not_a_rollover(tmp_path: Path) -> None:
    text = "Name,Position,Election Date\nAna Lee,Mayor,02/31/2025\nBo Chen,Mayor,2025-11-04\n"
    result = read_rows(write(tmp_path, text))
    assert [r.full_name for r in result.rows] == ["Bo Chen"]
    (rejected,) = result.rejected
    assert rejected.row_number == 1
    assert "impossible date '02/31/2025'" in rejected.reason
    assert rejected.values["full_name"] == "Ana Lee"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("11/04/2025", date(2025, 11, 4)),
        ("1/5/2025", date(2025, 1, 5)),
        ("11/4/25", date(2025, 11, 4)),
        ("2025-11-04", date(2025, 11, 4)),
        ("2025-11-04 00:00:00", date(2025, 11, 4)),
        ("2025-11-04T00:00:00", date(2025, 11, 4)),
    ],
)
def test_parse_date(text: str, expected: date) -> None:
    assert parse_date(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("02/30/2024", "impossible"),
        ("13/01/2025", "impossible"),
        ("2025-02-29", "impossible"),
        ("Nov 4 2025", "unrecognised"),
        ("45000", "unrecognised"),
        ("0025-11-04", "outside the years 1900-2200"),  # a typo, not 2025
        ("9999-12-31", "outside the years 1900-2200"),
        ("11/04/0025", "outside the years 1900-2200"),
    ],
)
def test_parse_date_rejects(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_date(text)


def test_blank_and_nameless_rows_are_skipped_with_warnings(tmp_path: Path) -> None:
    text = "Name,Position,Email\nAna Lee,Mayor,\n,,\n,,x@example.org\nBo Chen,Mayor,\n\n\n"
    result = read_rows(write(tmp_path, text))
    assert [r.row_number for r in result.rows] == [1, 4]
    messages = [str(w) for w in result.warnings]
    assert "row 3: skipped: no candidate name and no position" in messages
    assert "skipped 1 blank row(s): 2" in messages  # trailing blank lines are not rows


def test_missing_name_or_position_rejects_the_row(tmp_path: Path) -> None:
    text = "Name,Position\nAna Lee,\n,Mayor\nBo Chen,Mayor\n"
    result = read_rows(write(tmp_path, text))
    assert [(r.row_number, r.reason) for r in result.rejected] == [
        (1, "missing position/contest"),
        (2, "missing candidate name"),
    ]


def test_bad_email_and_seats_are_warnings(tmp_path: Path) -> None:
    text = "Name,Position,Email,Seats\nAna Lee,Mayor,not-an-email,two\n"
    result = read_rows(write(tmp_path, text))
    assert (result.rows[0].email, result.rows[0].seats) == (None, None)
    assert {str(w) for w in result.warnings} == {
        "row 1: invalid e-mail 'not-an-email' ignored",
        "row 1: seats 'two' is not a whole number from 1 to 10000; ignored",
    }


# --- whole-file errors --------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"  \r\n\r\n"])
def test_empty_file(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(IngestError, match="the file is empty"):
        read_rows(write(tmp_path, data))


def test_header_only_file(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="header but no data rows"):
        read_rows(write(tmp_path, TEMPLATE_HEADER))


def test_no_header(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="no header row recognised") as info:
        read_rows(write(tmp_path, "Ana,Lee,Mayor\nBo,Chen,Mayor\n"))
    assert "'Ana', 'Lee', 'Mayor'" in str(info.value)


def test_missing_position_column_names_what_was_found_and_accepted(tmp_path: Path) -> None:
    with pytest.raises(IngestError) as info:
        read_rows(write(tmp_path, "FirstName,LastName,Email,City\nAna,Lee,,Ithaca\n"))
    message = str(info.value)
    assert "missing a position/contest column" in message
    assert "contestname" in message and "office" in message  # what would have been accepted
    assert "columns found: 'FirstName', 'LastName', 'Email', 'City'" in message
    assert "candidate name" not in message


def test_missing_name_column(tmp_path: Path) -> None:
    with pytest.raises(IngestError) as info:
        read_rows(write(tmp_path, "Email,Position\na@example.org,Mayor\n"))
    assert "missing a candidate name column" in str(info.value)
    assert "nameonballot" in str(info.value) and "firstname" in str(info.value)


def test_no_usable_rows(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match=r"no usable rows \(row 1: missing position/contest\)"):
        read_rows(write(tmp_path, "Name,Position\nAna Lee,\n"))


@pytest.mark.parametrize(
    ("name", "needle"),
    [("c.pdf", r"unsupported file type \.pdf"), ("c.xls", r"old \.xls workbooks")],
)
def test_unsupported_extension(tmp_path: Path, name: str, needle: str) -> None:
    with pytest.raises(IngestError, match=needle):
        read_rows(write(tmp_path, "x", name))


def test_corrupt_xlsx(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match=r"not a readable \.xlsx"):
        read_rows(write(tmp_path, "Name,Position\n", "fake.xlsx"))


# --- workbooks and samples ----------------------------------------------------------------------


def test_xlsx_sample_matches_csv_sample() -> None:
    from_csv = read_rows(SAMPLES / "sample_template.csv")
    from_xlsx = read_rows(SAMPLES / "sample_template.xlsx")
    assert from_xlsx.encoding is None
    assert [r.model_dump(exclude={"raw"}) for r in from_xlsx.rows] == [
        r.model_dump(exclude={"raw"}) for r in from_csv.rows
    ]
    assert len(from_csv.rows) == 10


def test_xlsx_date_and_number_cells(tmp_path: Path) -> None:
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["Name", "Contest", "Election Date", "Vote For", "Phone"])
    sheet.append(["Ana Lee", "Mayor", datetime(2025, 11, 4), 2.0, 5551234567])
    sheet.append([None, None, None, None, None])  # trailing formatting rows are not data
    path = tmp_path / "dates.xlsx"
    book.save(path)
    (row,) = read_rows(path).rows
    assert (row.election_date, row.year, row.seats, row.phone) == (
        date(2025, 11, 4),
        2025,
        2,
        "5551234567",
    )


def test_nc_sample() -> None:
    result = read_rows(SAMPLES / "sample_nc.csv")
    assert len(result.rows) == 41
    assert result.rejected == () and result.warnings == ()
    assert any(r.full_name.startswith("=") for r in result.rows)
    assert any(r.full_name == "José Muñoz" for r in result.rows)


# --- the real NC listing ------------------------------------------------------------------------


@pytest.mark.skipif(not NC_CSV.exists(), reason="shared/data/nc_candidates_2025.csv not present")
def test_real_nc_file() -> None:
    result = read_rows(NC_CSV)
    text = NC_CSV.read_bytes().decode("cp1252")
    records = list(csv.DictReader(io.StringIO(text, newline="")))
    assert len(result.rows) == len(records) == 3120
    assert result.rejected == ()
    # The one stray byte is reported against its row, and the row is kept.
    (warning,) = result.warnings
    assert warning.row_number is not None
    assert "«" in (result.rows[warning.row_number - 1].mailing_address or "")
    assert result.ignored_columns == ("is_unexpired", "has_primary", "is_partisan")
    elections = {(r["contest_name"].strip(), r["election_dt"]) for r in records}
    assert len({(r.position, r.election_date) for r in result.rows}) == len(elections) == 988


def test_out_of_range_years_and_seats_are_ignored_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    path.write_text(
        "FirstName,LastName,Municipality,State,Position,Year,Seats\n"
        "Ada,Lane,Springfield,Ohio,Mayor,99999999999,5000000000\n",
        encoding="utf-8",
    )
    result = read_rows(path)
    (row,) = result.rows
    assert (row.year, row.seats) == (None, None)
    messages = [str(w) for w in result.warnings]
    assert "row 1: year '99999999999' is not a whole number from 1900 to 2200; ignored" in messages
