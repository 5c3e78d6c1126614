"""Finishing a later stage when an earlier one left a large output on the item.

    .venv/bin/python bench/large_outputs.py [--json] [--items 2000] [--kb 50]
        [--pg postgresql+psycopg://postgres@127.0.0.1:5432/postgres] [--sqlite]

Model answers are often tens of kilobytes, and an item keeps every stage's output (a later
stage's prompt reads them). This measures what that costs the finish of the next stage, the
store alone (no dispatcher): a fresh database (PostgreSQL, or a SQLite file with --sqlite), one
run of N items through two stages; stage one completes with a --kb output per item (a text and
a list, like an analysis), then stage two is claimed and completed in batches of 128 with a
small output. Reported: the worker's CPU time and the wall time per stage-two finish, and the
item rows' stored size afterwards (so a finish that lost stage one's output would show).

To compare two revisions, run this script with PYTHONPATH pointing at another checkout's src/
(it uses only the public Store API). Progress goes to stderr; the last line of stdout is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BATCH = 128


def log(message: str) -> None:
    print(f"[large_outputs] {message}", file=sys.stderr, flush=True)


def burn(store: Any, stage: str, output: Any) -> tuple[float, float, int]:
    """Claim and complete every job of `stage`; (CPU s, wall s) of the finishes, and jobs."""
    from llm_batch_queue.jobs import AttemptResult
    from llm_batch_queue.store.base import Completion

    cpu = wall = 0.0
    done = 0
    while claimed := store.claim(
        worker="bench", now=time.time(), limit=BATCH, lease_s=60, stages=[stage]
    ):
        now = time.time()
        batch = [Completion(c.lease, AttemptResult(now, now), output) for c in claimed]
        started, started_cpu = time.perf_counter(), time.thread_time()
        held = store.finish(batch, time.time())
        cpu += time.thread_time() - started_cpu
        wall += time.perf_counter() - started
        if not all(held):
            raise SystemExit("a finish lost its lease: nothing else runs here")
        done += len(claimed)
    return cpu, wall, done


def measure(url: str, items: int, kb: int) -> dict[str, Any]:
    from llm_batch_queue.jobs import NewItem, Scope, StageSpec
    from llm_batch_queue.store.sql import open_store

    store = open_store(url)
    stages = {
        "analyze": StageSpec("analyze", Scope.ITEM),
        "structure": StageSpec("structure", Scope.ITEM, after=("analyze",)),
    }
    run = store.create_run(
        pipeline="bench", name="large outputs", stages=stages,
        items=[NewItem(str(i), {"row": i}) for i in range(items)], meta={}, now=time.time(),
    )  # fmt: skip
    facts = [{"n": i, "fact": f"fact {i}"} for i in range(kb * 4)]  # about a tenth
    text = ("candidate analysis " * (kb * 1024 // 19 + 1))[: kb * 1024 * 9 // 10]
    analysis = {"text": text, "facts": facts}
    size = len(json.dumps(analysis))
    log(f"stage one: {items} outputs of {size / 1024:.0f} KiB")
    burn(store, "analyze", analysis)
    log("stage two, measured")
    cpu, wall, done = burn(store, "structure", {"ok": True})
    kept = store.items(run.id)
    intact = all(item.outputs.get("analyze") == analysis for item in kept)
    store.close()
    return {
        "items": items,
        "stage_one_output_bytes": size,
        "finishes": done,
        "finish_cpu_us_per_job": round(cpu / done * 1e6, 1),
        "finish_wall_us_per_job": round(wall / done * 1e6, 1),
        "outputs_intact": intact,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--kb", type=int, default=50, help="stage one's output per item, KiB")
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--sqlite", action="store_true", help="a SQLite file instead")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = parser.parse_args()
    if args.sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            result = measure(f"sqlite:///{Path(tmp) / 'bench.db'}", args.items, args.kb)
        result["database"] = "sqlite"
    else:
        import psycopg
        from sqlalchemy.engine import make_url

        server = make_url(args.pg).set(drivername="postgresql")
        admin = psycopg.connect(server.render_as_string(hide_password=False), autocommit=True)
        db = f"lbq_outputs_{uuid.uuid4().hex[:12]}"
        admin.execute(f'CREATE DATABASE "{db}"')
        try:
            url = make_url(args.pg).set(database=db).render_as_string(hide_password=False)
            result = measure(url, args.items, args.kb)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        result["database"] = "postgresql"
    if not args.json:
        log(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
