"""Four dispatcher processes share one store and one simulated model's tight limits.

The simulator (its own process) enforces the limits over exact sliding 60-second windows and
answers 429 to anything over them; the dispatchers (four more processes, the real google-genai
SDK over HTTP) must never provoke one. There is more work than one minute's quota, so the ledger
must carry the workers across a second window. Request sizes vary, so TPM binds as well as RPM.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _multiprocess_worker import MODEL, build_pipeline

from llm_batch_queue import ItemStatus, NewItem, RunStatus
from llm_batch_queue.store.sql import open_store

RPM, TPM = 20, 3_000
ITEMS = 30  # more than a minute's RPM, less than two minutes' RPM and TPM: done after ~61 s
WORKERS = 4
WORKER = Path(__file__).with_name("_multiprocess_worker.py")
DEADLINE_S = 110.0  # a hang fails the test instead of stalling the suite


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WORKER.parent), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def simulator_url() -> Iterator[str]:
    spec = f"{MODEL}:rpm={RPM},tpm={TPM},latency=0.2-0.6"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_batch_queue.simulator", "--port", "0", "--model", spec],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        assert first.startswith("listening on "), first
        yield first.removeprefix("listening on ")
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def _texts() -> list[str]:
    """ITEMS prompts of 50-250 simulator tokens (4 characters each): 150 on average, so twenty
    of them come to about TPM and either limit can be the one that binds."""
    rng = random.Random(7)
    return [f"item {i} " + "x" * (4 * rng.randint(50, 250) - 8) for i in range(ITEMS)]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    return url


def _sim_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_sim/stats", timeout=10) as response:
        stats: dict[str, Any] = json.load(response)[MODEL]
    return stats


def test_four_worker_processes_never_exceed_the_providers_windows(
    shared_url: str, simulator_url: str
) -> None:
    pipeline = build_pipeline()
    store = open_store(shared_url)
    run = store.create_run(
        pipeline=pipeline.name,
        name="multiprocess",
        stages=pipeline.specs,
        items=[NewItem(str(i), {"text": t}) for i, t in enumerate(_texts())],
        meta={},
        now=time.time(),
    )
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), shared_url, simulator_url, str(RPM), str(TPM)],
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for _ in range(WORKERS)
    ]
    outputs: list[str] = []
    try:
        deadline = time.monotonic() + DEADLINE_S
        for worker in workers:
            out, _ = worker.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert worker.returncode == 0
            outputs.append(out)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    stats = [json.loads(out.strip().splitlines()[-1]) for out in outputs]

    sim = _sim_stats(simulator_url)
    assert sim["requests_by_status"].get("429", 0) == 0, sim
    assert sim["rate_limited"] == {}
    assert sim["max_requests_per_window"] <= RPM
    assert sim["max_input_tokens_per_window"] <= TPM
    # every item exactly once, and 30 admissions with at most 20 in any 60 s: a second window
    assert sim["admitted"] == ITEMS
    assert sum(s["succeeded"] for s in stats) == ITEMS
    assert sum(s["provider_429"] for s in stats) == 0
    assert sum(s["deferred"] for s in stats) > 0  # our own ledger did the holding back

    assert store.get_run(run.id).status is RunStatus.COMPLETED
    assert {i.status for i in store.items(run.id)} == {ItemStatus.COMPLETED}
    store.close()
