"""The quickstart the README points to runs as written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

QUICKSTART = Path(__file__).parents[1] / "examples" / "quickstart.py"


def test_quickstart_runs_offline_and_reports_every_item(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
    out = subprocess.run(
        [sys.executable, str(QUICKSTART)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert out.splitlines()[0] == "run: completed"
    items = {line.split()[0] for line in out.splitlines() if line.split()[1:2] == ["completed"]}
    assert items == {"run:", "a", "b", "c"}
    assert (tmp_path / "quickstart.db").exists()
