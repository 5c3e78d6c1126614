"""Read a candidate spreadsheet (.csv/.tsv or .xlsx/.xlsm) into validated rows.

The reader is strict where the original was silently lenient (D-24): missing columns, empty files
and impossible dates are reported with the row or column concerned, and nothing is dropped without
a warning. Cells that look like formulas (``=``, ``+``, ``-``, ``@``, tab, CR) are plain text here:
nothing is ever evaluated. They only become dangerous when written to a workbook (workbook.py).
"""

from __future__ import annotations

import bisect
import codecs
import csv
import io
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

import charset_normalizer
import openpyxl
from pydantic import BaseModel, ConfigDict

__all__ = [
    "HEADER_ALIASES",
    "CandidateRow",
    "IngestError",
    "IngestResult",
    "Issue",
    "RejectedRow",
    "normalise_header",
    "parse_date",
    "read_rows",
]

CSV_SUFFIXES = (".csv", ".tsv", ".txt")
XLSX_SUFFIXES = (".xlsx", ".xlsm")

# Normalised header -> field. One table for both the original template (§2.2 of the reference) and
# the NC State Board layout. When several columns feed one field, the first NON-EMPTY cell wins, in
# this table's order — so an empty "Position" column can no longer blank an "Office" value (D-24).
HEADER_ALIASES: dict[str, str] = {
    # the contest / office
    "position": "position",
    "contestname": "position",
    "contest": "position",
    "positiontitle": "position",
    "office": "position",
    "officename": "position",
    "seat": "position",
    "race": "position",
    "racename": "position",
    "racetitle": "position",
    "role": "position",
    # names
    "nameonballot": "full_name",
    "name": "full_name",
    "fullname": "full_name",
    "candidatename": "full_name",
    "ballotname": "full_name",
    "firstname": "first_name",
    "first": "first_name",
    "givenname": "first_name",
    "middlename": "middle_name",
    "middle": "middle_name",
    "lastname": "last_name",
    "last": "last_name",
    "surname": "last_name",
    "familyname": "last_name",
    "namesuffixlbl": "suffix",
    "namesuffix": "suffix",
    "suffix": "suffix",
    "nickname": "nickname",
    # contact
    "email": "email",
    "emailaddress": "email",
    "phone": "phone",
    "phonenumber": "phone",
    "businessphone": "phone",
    "officephone": "phone",
    "cellphone": "phone",
    "mailingaddress": "mailing_address",
    "streetaddress": "mailing_address",
    "address": "mailing_address",
    "city": "city",
    "zipcode": "zip_code",
    "zip": "zip_code",
    "postalcode": "zip_code",
    # where and when
    "municipality": "municipality",
    "town": "municipality",
    "jurisdiction": "municipality",
    "countyname": "county",
    "county": "county",
    "state": "state",
    "electiondt": "election_date",
    "electiondate": "election_date",
    "date": "election_date",
    "year": "year",
    "electionyear": "year",
    # the race's details
    "partycandidate": "party",
    "party": "party",
    "partypreference": "party",
    "partyaffiliation": "party",
    "partycontest": "party",
    "votefor": "seats",
    "seats": "seats",
    "numberofseats": "seats",
    "positions": "seats",
    "term": "term",
    "termlength": "term",
    "termtype": "term",
    "district": "district",
    "districttype": "district_type",
    "filingdate": "filing_date",
    "candidacydt": "filing_date",
    "candidacydate": "filing_date",
    "status": "status",
}

_NAME_FIELDS = ("full_name", "first_name", "last_name")
_EMAIL_RE = re.compile(r"^[^\s@]+@[^\s@]+\.[^\s@]+$")
_DELIMITERS = ",;\t|"
_MAX_LISTED_ROWS = 20


class IngestError(ValueError):
    """The file cannot be used at all; the message says what is missing."""


class CandidateRow(BaseModel):
    """One usable data row. Optional text is None when the cell was blank."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    row_number: int  # 1-based among the data rows (the header is row 0)
    full_name: str
    first_name: str | None = None
    middle_name: str | None = None
    last_name: str | None = None
    suffix: str | None = None
    nickname: str | None = None
    email: str | None = None
    phone: str | None = None
    mailing_address: str | None = None
    city: str | None = None
    zip_code: str | None = None
    municipality: str | None = None
    county: str | None = None
    state: str | None = None
    position: str
    election_date: date | None = None
    year: int | None = None
    party: str | None = None
    seats: int | None = None
    term: str | None = None
    district: str | None = None
    district_type: str | None = None
    filing_date: str | None = None
    status: str | None = None
    raw: dict[str, str] = {}  # header -> cell text exactly as read


@dataclass(frozen=True)
class Issue:
    row_number: int | None  # None: about the whole file
    message: str

    def __str__(self) -> str:
        return self.message if self.row_number is None else f"row {self.row_number}: {self.message}"


@dataclass(frozen=True)
class RejectedRow:
    """A data row that cannot be processed; it still belongs in the results workbook."""

    row_number: int
    reason: str
    values: dict[str, str]  # mapped fields that were present (best effort, for reporting)
    raw: dict[str, str]


@dataclass(frozen=True)
class IngestResult:
    source: str
    encoding: str | None  # None for workbooks
    columns: tuple[str, ...]  # header cells as found
    mapping: dict[str, str]  # used column -> field
    ignored_columns: tuple[str, ...]
    rows: tuple[CandidateRow, ...]
    rejected: tuple[RejectedRow, ...] = ()
    warnings: tuple[Issue, ...] = field(default_factory=tuple)


def normalise_header(header: str) -> str:
    """``"First Name"``, ``first_name`` and ``FIRSTNAME`` all become ``firstname``."""
    return re.sub(r"[^0-9a-z]", "", header.casefold())


def read_rows(path: str | Path) -> IngestResult:
    """Read and validate a spreadsheet; raise IngestError if it is unusable as a whole."""
    path = Path(path)
    suffix = path.suffix.lower()
    warnings: list[Issue] = []
    if suffix in CSV_SUFFIXES:
        data = path.read_bytes()
        if not data.strip():
            raise IngestError(f"{path.name}: the file is empty")
        text, encoding, bad_lines = _decode(data)
        records, record_lines = _parse_csv(text, tab=suffix == ".tsv")
        warnings.extend(_encoding_warnings(encoding, bad_lines, record_lines))
    elif suffix in XLSX_SUFFIXES:
        encoding = None
        records = _read_xlsx(path)
    elif suffix == ".xls":
        raise IngestError(
            f"{path.name}: old .xls workbooks are not supported; save as .xlsx or .csv"
        )
    else:
        accepted = ", ".join(CSV_SUFFIXES + XLSX_SUFFIXES)
        raise IngestError(
            f"{path.name}: unsupported file type {suffix or '(none)'}; use {accepted}"
        )
    return _build_result(path.name, encoding, records, warnings)


# --- decoding ------------------------------------------------------------------------------------


def _decode(data: bytes) -> tuple[str, str, list[int]]:
    """Return (text, encoding, 1-based physical lines that were not valid UTF-8)."""
    for bom, name in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32")):
        if data.startswith(bom):
            return data.decode(name, errors="replace"), name, []
    for bom, name in ((codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            return data.decode(name, errors="replace"), name, []
    encoding = "utf-8"
    if data.startswith(codecs.BOM_UTF8):
        data, encoding = data[len(codecs.BOM_UTF8) :], "utf-8-sig"
    try:
        return data.decode("utf-8"), encoding, []
    except UnicodeDecodeError:
        pass
    fallback = _guess_legacy_encoding(data)
    if fallback.startswith("utf-16") or fallback.startswith("utf-32"):
        return data.decode(fallback, errors="replace"), fallback, []
    # Decode line by line: a UTF-8 file with one stray byte keeps its real UTF-8 text, a legacy
    # file's ASCII lines are identical either way, and the rows that needed the fallback are known.
    parts: list[str] = []
    bad_lines: list[int] = []
    for number, line in enumerate(data.splitlines(keepends=True), start=1):
        try:
            parts.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            parts.append(line.decode(fallback, errors="replace"))
            bad_lines.append(number)
    return "".join(parts), fallback, bad_lines


def _guess_legacy_encoding(data: bytes) -> str:
    """cp1252 unless the bytes say otherwise.

    charset-normalizer is unreliable on mostly-ASCII spreadsheets: it calls the real NC file cp1250
    (which would turn a Spanish ñ into ń) and a three-line file with one stray byte cp932. So its
    guess is only taken for UTF-16/32 without a BOM, or when cp1252 cannot decode the bytes at all.
    """
    best = charset_normalizer.from_bytes(data).best()
    guess = best.encoding if best is not None else None
    if guess and (guess.startswith("utf_16") or guess.startswith("utf_32")):
        return guess.replace("_", "-")
    try:
        data.decode("cp1252")
    except UnicodeDecodeError:
        if guess in {"cp1250", "cp1251", "cp1257", "latin_1", "iso8859_15", "iso8859_2"}:
            return guess
    return "cp1252"


def _encoding_warnings(
    encoding: str, bad_lines: Sequence[int], record_lines: Sequence[tuple[int, int]]
) -> list[Issue]:
    if not bad_lines:
        return []
    # A record's number is the index of the first record ending at or after the line (0 = header).
    ends = [last for _, last in record_lines]
    rows = sorted({bisect.bisect_left(ends, line) for line in bad_lines})
    listed = ", ".join(str(r) for r in rows[:_MAX_LISTED_ROWS])
    more = f" and {len(rows) - _MAX_LISTED_ROWS} more" if len(rows) > _MAX_LISTED_ROWS else ""
    if rows == [0]:
        return [Issue(None, f"header: bytes that are not valid UTF-8 were read as {encoding}")]
    if len(rows) == 1:
        return [Issue(rows[0], f"bytes that are not valid UTF-8 were read as {encoding}")]
    return [
        Issue(
            None, f"bytes that are not valid UTF-8 were read as {encoding} in rows {listed}{more}"
        )
    ]


# --- parsing -------------------------------------------------------------------------------------


def _parse_csv(text: str, *, tab: bool) -> tuple[list[list[str]], list[tuple[int, int]]]:
    """Return the records and, per record, its first and last physical line."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = "\t" if tab else max(_DELIMITERS, key=first_line.count)
    if first_line.count(delimiter) == 0:
        delimiter = ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records: list[list[str]] = []
    spans: list[tuple[int, int]] = []
    previous = 0
    try:
        for record in reader:
            records.append(record)
            spans.append((previous + 1, reader.line_num))
            previous = reader.line_num
    except csv.Error as exc:
        raise IngestError(
            f"cannot parse the file as CSV near line {reader.line_num}: {exc}"
        ) from exc
    # Leading blank lines are not part of the data: the header is the first non-blank record.
    while records and _is_blank(records[0]):
        records.pop(0)
        spans.pop(0)
    return records, spans


def _read_xlsx(path: Path) -> list[list[str]]:
    """First sheet only; formulas give their cached value (we never evaluate anything)."""
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many unrelated types for a corrupt file
        raise IngestError(f"{path.name}: not a readable .xlsx workbook ({exc})") from exc
    try:
        if not book.worksheets:
            raise IngestError(f"{path.name}: the workbook has no sheets")
        sheet = book.worksheets[0]
        records = [
            [_cell_text(value) for value in row] for row in sheet.iter_rows(values_only=True)
        ]
    finally:
        book.close()
    while records and _is_blank(records[0]):
        records.pop(0)
    return records


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, datetime):
        return value.date().isoformat() if value.time() == time(0) else value.isoformat()
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _is_blank(record: Iterable[str]) -> bool:
    return all(not cell.strip() for cell in record)


# --- validation ----------------------------------------------------------------------------------


def _build_result(
    source: str, encoding: str | None, records: list[list[str]], warnings: list[Issue]
) -> IngestResult:
    if not records:
        raise IngestError(f"{source}: the file is empty")
    header = [cell.strip() for cell in records[0]]
    mapping = _map_header(source, header)
    sources = _field_sources(header, mapping)
    raw_keys = _raw_keys(header)

    data = records[1:]
    while data and _is_blank(data[-1]):
        data.pop()  # trailing blank lines/rows are formatting, not data
    if not data:
        raise IngestError(f"{source}: the file has a header but no data rows")

    rows: list[CandidateRow] = []
    rejected: list[RejectedRow] = []
    blank: list[int] = []
    for number, record in enumerate(data, start=1):
        if _is_blank(record):
            blank.append(number)
            continue
        if len(record) > len(header) and any(c.strip() for c in record[len(header) :]):
            warnings.append(Issue(number, f"{len(record)} cells but {len(header)} columns"))
        raw = {key: record[i] if i < len(record) else "" for i, key in enumerate(raw_keys)}
        values = _pick_values(record, sources)
        outcome = _make_row(number, values, raw, warnings)
        if isinstance(outcome, CandidateRow):
            rows.append(outcome)
        elif outcome is None:
            warnings.append(Issue(number, "skipped: no candidate name and no position"))
        else:
            rejected.append(RejectedRow(number, outcome, values, raw))
    if blank:
        listed = ", ".join(str(n) for n in blank[:_MAX_LISTED_ROWS])
        warnings.append(Issue(None, f"skipped {len(blank)} blank row(s): {listed}"))
    if not rows:
        reasons = "; ".join(f"row {r.row_number}: {r.reason}" for r in rejected[:5])
        detail = f" ({reasons})" if reasons else ""
        raise IngestError(f"{source}: no usable rows{detail}")
    ignored = tuple(h for h in header if h and h not in mapping)
    return IngestResult(
        source=source,
        encoding=encoding,
        columns=tuple(header),
        mapping=mapping,
        ignored_columns=ignored,
        rows=tuple(rows),
        rejected=tuple(rejected),
        warnings=tuple(warnings),
    )


def _map_header(source: str, header: Sequence[str]) -> dict[str, str]:
    mapping = {
        h: HEADER_ALIASES[normalise_header(h)]
        for h in header
        if normalise_header(h) in HEADER_ALIASES
    }
    found = ", ".join(repr(h) for h in header if h) or "(none)"
    if not mapping:
        raise IngestError(
            f"{source}: no header row recognised: the first row has {found}; "
            "expected column names such as FirstName, LastName, Email, Municipality, State, "
            "Position, Year (or contest_name, name_on_ballot, election_dt)"
        )
    fields = set(mapping.values())
    missing = []
    if "position" not in fields:
        missing.append(f"a position/contest column (accepted: {_accepted('position')})")
    if not fields.intersection(_NAME_FIELDS):
        accepted = ", ".join(_accepted(f) for f in _NAME_FIELDS)
        missing.append(f"a candidate name column (accepted: {accepted})")
    if missing:
        raise IngestError(
            f"{source}: missing {' and '.join(missing)}; columns found: {found} "
            "(column names are matched ignoring case, spaces and punctuation)"
        )
    return mapping


def _accepted(field_name: str) -> str:
    return ", ".join(alias for alias, target in HEADER_ALIASES.items() if target == field_name)


def _field_sources(header: Sequence[str], mapping: Mapping[str, str]) -> dict[str, list[int]]:
    """Field -> column indexes, in alias-table priority order (then left to right)."""
    priority = {alias: rank for rank, alias in enumerate(HEADER_ALIASES)}
    sources: dict[str, list[int]] = {}
    ranked = sorted(
        (priority[normalise_header(h)], i, mapping[h]) for i, h in enumerate(header) if h in mapping
    )
    for _, index, target in ranked:
        sources.setdefault(target, []).append(index)
    return sources


def _raw_keys(header: Sequence[str]) -> list[str]:
    seen: Counter[str] = Counter()
    keys = []
    for index, cell in enumerate(header):
        name = cell or f"column {index + 1}"
        seen[name] += 1
        keys.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return keys


def _pick_values(record: Sequence[str], sources: Mapping[str, list[int]]) -> dict[str, str]:
    values: dict[str, str] = {}
    for target, indexes in sources.items():
        for index in indexes:
            cell = record[index].strip() if index < len(record) else ""
            if cell:
                values[target] = cell
                break
    return values


def _make_row(
    number: int, values: dict[str, str], raw: dict[str, str], warnings: list[Issue]
) -> CandidateRow | str | None:
    """A row, a rejection reason, or None for a row with neither name nor position."""
    first, last, full = values.get("first_name"), values.get("last_name"), values.get("full_name")
    position = values.get("position")
    if not (first or last or full):
        return None if not position else "missing candidate name"
    if not position:
        return "missing position/contest"
    if not full:
        full = " ".join(p for p in (first, last, values.get("suffix")) if p)
    elif not (first or last):
        first, _, rest = full.partition(" ")
        last = rest or None
    try:
        election_date = parse_date(values["election_date"]) if "election_date" in values else None
    except ValueError as exc:
        return f"election date: {exc}"
    year = _parse_int(values.get("year"), "year", number, warnings)
    if election_date is not None:
        if year is not None and year != election_date.year:
            warnings.append(
                Issue(number, f"year {year} differs from election date {election_date}")
            )
        year = election_date.year
    return CandidateRow(
        row_number=number,
        full_name=full,
        first_name=first,
        middle_name=values.get("middle_name"),
        last_name=last,
        suffix=values.get("suffix"),
        nickname=values.get("nickname"),
        email=_parse_email(values.get("email"), number, warnings),
        phone=values.get("phone"),
        mailing_address=values.get("mailing_address"),
        city=values.get("city"),
        zip_code=values.get("zip_code"),
        municipality=values.get("municipality"),
        county=values.get("county"),
        state=values.get("state"),
        position=position,
        election_date=election_date,
        year=year,
        party=values.get("party"),
        seats=_parse_int(values.get("seats"), "seats", number, warnings),
        term=values.get("term"),
        district=values.get("district"),
        district_type=values.get("district_type"),
        filing_date=values.get("filing_date"),
        status=values.get("status"),
        raw=raw,
    )


def _parse_email(value: str | None, number: int, warnings: list[Issue]) -> str | None:
    if not value:
        return None
    email = value.strip().lower()
    if not _EMAIL_RE.match(email):
        warnings.append(Issue(number, f"invalid e-mail {value!r} ignored"))
        return None
    return email


# plausible ranges: beyond them a value is a typo, and would overflow an INTEGER column
_INT_RANGES = {"year": (1900, 2200), "seats": (1, 10_000)}


def _parse_int(value: str | None, what: str, number: int, warnings: list[Issue]) -> int | None:
    if not value:
        return None
    try:
        parsed = float(value)
    except ValueError:
        parsed = float("nan")
    low, high = _INT_RANGES.get(what, (1, 2**31 - 1))
    if not parsed.is_integer() or not low <= parsed <= high:
        warnings.append(
            Issue(number, f"{what} {value!r} is not a whole number from {low} to {high}; ignored")
        )
        return None
    return int(parsed)


_DATE_PATTERNS = (
    (re.compile(r"^(\d{1,2})/(\d{1,2})/(\d{4}|\d{2})$"), ("m", "d", "y")),
    (re.compile(r"^(\d{1,2})-(\d{1,2})-(\d{4})$"), ("m", "d", "y")),
    (
        re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})(?:[T ]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?$"),
        ("y", "m", "d"),
    ),
)


def parse_date(value: str | date) -> date:
    """Parse MM/DD/YYYY (US order), M/D/YY or YYYY-MM-DD[ time]; impossible dates -> ValueError."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    text = value.strip()
    for pattern, order in _DATE_PATTERNS:
        match = pattern.match(text)
        if match:
            groups = dict(zip(order, match.groups(), strict=True))
            parts = {k: int(g) for k, g in groups.items()}
            # only a two-digit year is short for 20YY: "0025-11-04" is a typo, not 2025
            year = parts["y"] + 2000 if len(groups["y"]) == 2 else parts["y"]
            low, high = _INT_RANGES["year"]
            if not low <= year <= high:
                raise ValueError(f"date {value!r} is outside the years {low}-{high}")
            try:
                return date(year, parts["m"], parts["d"])
            except ValueError:
                raise ValueError(f"impossible date {value!r}") from None
    raise ValueError(f"unrecognised date {value!r} (use MM/DD/YYYY or YYYY-MM-DD)")
