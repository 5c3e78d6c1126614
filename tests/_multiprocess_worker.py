"""One dispatcher process for tests/test_multiprocess_limits.py.

    python tests/_multiprocess_worker.py STORE_URL SIMULATOR_URL RPM TPM

Builds the test's pipeline, a SQLStore on the shared database and a GeminiAdapter (the real
google-genai SDK) pointed at the simulator, runs `run_until_idle`, and prints its DispatchStats
as one JSON line.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import anyio

from llm_batch_queue import (
    Dispatcher,
    DispatcherSettings,
    ModelLimits,
    ModelStage,
    Pipeline,
    Prompt,
)
from llm_batch_queue.adapters.gemini import GeminiAdapter
from llm_batch_queue.store.sql import open_store

MODEL = "gemini-2.5-flash"


def build_pipeline() -> Pipeline:
    # the item's payload carries its own text, so request sizes (and TPM charges) vary per item
    return Pipeline(
        "multiprocess-limits",
        (ModelStage("ask", (MODEL,), lambda ctx: Prompt(str(ctx.payload["text"]))),),
    )


async def work(store_url: str, simulator_url: str, rpm: int, tpm: int) -> dict[str, int]:
    store = open_store(store_url)
    adapter = GeminiAdapter(api_key="simulated", base_url=simulator_url, timeout_ms=30_000)
    dispatcher = Dispatcher(
        store,
        build_pipeline(),
        adapter,
        limits={MODEL: ModelLimits(rpm=rpm, tpm=tpm)},
        settings=DispatcherSettings(concurrency=8),
    )
    try:
        stats = await dispatcher.run_until_idle()
    finally:
        await adapter.aclose()
        store.close()
    return asdict(stats)


def main() -> None:
    store_url, simulator_url, rpm, tpm = sys.argv[1:5]
    print(json.dumps(anyio.run(work, store_url, simulator_url, int(rpm), int(tpm))), flush=True)


if __name__ == "__main__":
    main()
