"""Regenerate sample_template.xlsx from sample_template.csv (run from anywhere).

The workbook holds the same rows as the CSV, with Year as a number cell the way a person typing
into Excel would leave it; the fixed document dates keep the output byte-stable between runs.
"""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path

from openpyxl import Workbook

HERE = Path(__file__).parent


def main() -> None:
    with (HERE / "sample_template.csv").open(newline="", encoding="utf-8") as f:
        records = list(csv.reader(f))
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "Candidates"
    header, *rows = records
    sheet.append(header)
    year = header.index("Year")
    for row in rows:
        sheet.append(
            [int(cell) if i == year and cell.isdigit() else cell for i, cell in enumerate(row)]
        )
    book.properties.created = book.properties.modified = datetime(2025, 1, 1)
    book.save(HERE / "sample_template.xlsx")


if __name__ == "__main__":
    main()
