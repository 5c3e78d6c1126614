"""Time the reference app on the real NC listing (offline simulator, SQLite or --db URL).

    .venv/bin/python bench/elevra_nc.py [--file ../shared/data/nc_candidates_2025.csv] [--db URL]

Last line: a JSON object with the app's summary plus rows/s, jobs/s and peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.elevra_upload.cli import main

DEFAULT_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "nc_candidates_2025.csv"


def run() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--db", help="database URL (default: a fresh SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        argv = ["run", str(args.file), "--out", out, "--json", "--quiet"]
        if args.db:
            argv += ["--db", args.db]
        buffer = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(buffer):
            code = main(argv)
        wall = time.perf_counter() - started
    summary = json.loads(buffer.getvalue().strip().splitlines()[-1])
    summary.update(
        exit_code=code,
        wall_s=round(wall, 2),
        rows_per_s=round(summary["rows"] / wall, 1),
        jobs_per_s=round(summary["jobs"] / wall, 1),
        peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    run()
