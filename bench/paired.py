"""Two revisions of ours, alternating: is a change faster? (bench/throughput.py, ours only)

    .venv/bin/python bench/paired.py BASE [CHANGE] [--rounds 4] [--processes 1]
        [--jobs 10000] [--variant c256-b128] [--json]

This machine's speed drifts by 10-30 % within minutes, more than most single changes move
throughput, so two runs taken minutes apart compare the machine more than the code. Here each
round runs both revisions back to back, in random order, each in a git worktree of its own
(imported through PYTHONPATH, on this checkout's venv), and the verdict is the median over the
rounds of the per-round ratios CHANGE/BASE. CHANGE defaults to the working tree's HEAD.

Each run is one bench/throughput.py configuration of the revision's own bench script: a fresh
database, the jobs enqueued, VACUUM ANALYZE, a wait for idle CPUs, then the burn-down. The last
line is a JSON object: the rounds and the median ratios of jobs/s and of worker CPU per job.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    print(f"[paired] {message}", file=sys.stderr, flush=True)


def worktree(rev: str, where: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(where), rev], check=True
    )
    return where


def run(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable, str(tree / "bench" / "throughput.py"), "--json", "--systems", "ours",
        "--variants", args.variant, "--processes", str(args.processes), "--jobs", str(args.jobs),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{tree}: bench/throughput.py failed:\n{out.stderr[-2000:]}")
    (result,) = json.loads(out.stdout.strip().splitlines()[-1])["runs"].values()
    return {k: result[k] for k in ("jobs_per_s", "worker_cpu_ms_per_job", "machine_cpu_busy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="the revision to compare against")
    parser.add_argument("change", nargs="?", default="HEAD", help="the revision to judge")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--variant", default="c256-b128", help="a variant of ours (throughput.py)")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = parser.parse_args()
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lbq-paired-") as tmp:
        trees = {
            "base": worktree(args.base, Path(tmp) / "base"),
            "change": worktree(args.change, Path(tmp) / "change"),
        }
        try:
            for i in range(args.rounds):
                order = random.sample(sorted(trees), 2)
                got = {name: run(trees[name], args) for name in order}
                ratio = got["change"]["jobs_per_s"] / got["base"]["jobs_per_s"]
                cpu = got["change"]["worker_cpu_ms_per_job"] / got["base"]["worker_cpu_ms_per_job"]
                rounds.append({"order": order, **got, "ratio": ratio, "cpu_ratio": cpu})
                log(f"round {i + 1}: {json.dumps(rounds[-1])}")
        finally:
            for tree in trees.values():
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                    check=False,
                )
    summary = {
        "base": args.base,
        "change": args.change,
        "processes": args.processes,
        "jobs": args.jobs,
        "variant": args.variant,
        "rounds": rounds,
        "median_jobs_per_s_ratio": round(statistics.median(r["ratio"] for r in rounds), 3),
        "median_worker_cpu_ratio": round(statistics.median(r["cpu_ratio"] for r in rounds), 3),
    }
    if not args.json:
        print(
            f"change/base over {len(rounds)} rounds: jobs/s x{summary['median_jobs_per_s_ratio']}"
            f", worker CPU per job x{summary['median_worker_cpu_ratio']}"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
