"""A WorkerApp factory for tests/test_worker.py: `llm-batch-queue worker --app _worker_app:app`.

One model stage whose scripted adapter takes `LBQ_TEST_LATENCY_S` seconds per call, and a task
stage that appends the item's key to the file named by `LBQ_TEST_EFFECTS` (one line per run of
it: a key twice is a duplicate side effect). Polls only every `LBQ_TEST_POLL_S` seconds, so a
worker that finds new work sooner was woken.
"""

from __future__ import annotations

import os

from llm_batch_queue import DispatcherSettings, ModelStage, Pipeline, Prompt, TaskStage
from llm_batch_queue.adapters.scripted import ScriptedAdapter
from llm_batch_queue.pipeline import StageContext
from llm_batch_queue.store.base import Store
from llm_batch_queue.worker import WorkerApp


async def record(ctx: StageContext) -> str:
    assert ctx.item is not None
    with open(os.environ["LBQ_TEST_EFFECTS"], "a", encoding="utf-8") as fh:
        fh.write(f"{ctx.item.key}\n")
    return ctx.item.key


PIPELINE = Pipeline(
    "worker-test",
    (
        ModelStage("ask", ("m",), lambda ctx: Prompt(f"ask {ctx.payload}")),
        TaskStage("record", record, after=("ask",)),
    ),
)


def app(store: Store) -> WorkerApp:
    return WorkerApp(
        PIPELINE,
        ScriptedAdapter(latency_s=float(os.environ.get("LBQ_TEST_LATENCY_S", "0"))),
        settings=DispatcherSettings(
            concurrency=4,
            lease_s=float(os.environ.get("LBQ_TEST_LEASE_S", "60")),
            heartbeat_s=float(os.environ.get("LBQ_TEST_LEASE_S", "60")) / 4,
            idle_poll_s=float(os.environ.get("LBQ_TEST_POLL_S", "1")),
        ),
    )


def not_an_app(store: Store) -> str:
    """A factory that returns the wrong thing, for the CLI's error message."""
    return "not a WorkerApp"
