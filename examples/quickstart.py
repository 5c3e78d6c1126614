"""A complete two-stage pipeline: summarize with Gemini (fallback chain), then save.

    python examples/quickstart.py            # offline, against the bundled simulator
    GEMINI_API_KEY=... python examples/quickstart.py --real

It prints each item's output, then the attempts the store recorded.
"""

from __future__ import annotations

import os
import sys
import time

import anyio
from pydantic import BaseModel

from llm_batch_queue import (
    Dispatcher,
    ModelLimits,
    ModelStage,
    NewItem,
    Pipeline,
    Prompt,
    StageContext,
    TaskStage,
)
from llm_batch_queue.adapters.gemini import GeminiAdapter
from llm_batch_queue.simulator import ModelConfig, Simulator
from llm_batch_queue.store.sql import open_store

TEXTS = {
    "a": "The council approved the new library budget after a long debate.",
    "b": "Heavy rain closed two bridges; crews expect to reopen them on Monday.",
    "c": "The school board will vote on later start times next month.",
}
LIMITS = {
    "gemini-2.5-flash": ModelLimits(rpm=60, tpm=100_000, rpd=1_000),
    "gemini-2.5-flash-lite": ModelLimits(rpm=120),
}


class Summary(BaseModel):  # the model is asked for JSON of this shape, and its reply validated
    title: str
    topics: list[str]


async def save(ctx: StageContext) -> dict[str, str]:
    summary = ctx.output("summarize")  # the earlier stage's validated output
    # write it wherever it belongs, idempotently: a job may run again after a crash
    return {"saved": summary["title"]}


pipeline = Pipeline(
    "summaries",
    (
        ModelStage(
            "summarize",
            ("gemini-2.5-flash", "gemini-2.5-flash-lite"),  # primary, then fallback
            lambda ctx: Prompt(f"Summarize as JSON:\n{ctx.payload['text']}"),
            output_type=Summary,
        ),
        TaskStage("save", save, after=("summarize",)),  # calls no model: reserves no quota
    ),
)


def main() -> None:
    real = "--real" in sys.argv
    simulator = None if real else Simulator({m: ModelConfig(rpm=60) for m in LIMITS}).start()
    store = open_store("sqlite:///quickstart.db")  # or postgresql+psycopg://…, or memory://
    run = store.create_run(
        pipeline=pipeline.name,
        name="quickstart",
        stages=pipeline.specs,
        items=[NewItem(key, {"text": text}) for key, text in TEXTS.items()],
        meta={},
        now=time.time(),
    )
    adapter = GeminiAdapter(
        api_key=os.environ["GEMINI_API_KEY"] if real else "simulated",
        base_url=None if simulator is None else simulator.url,
    )
    dispatcher = Dispatcher(store, pipeline, adapter, limits=LIMITS)

    async def drive() -> None:
        try:
            await dispatcher.run_until_idle(run_id=run.id)  # or run_once(time_budget_s=50)
        finally:
            await adapter.aclose()

    anyio.run(drive)
    print("run:", store.get_run(run.id).status.value)
    for item in store.items(run.id):
        print(item.key, item.status.value, item.outputs.get("save"))
    for attempt in store.attempts(run.id):
        r = attempt.result
        print(
            f"  {attempt.item_key} {attempt.stage}: model={r.model} fallback={r.is_fallback}"
            f" tokens={r.input_tokens}/{r.output_tokens} error={r.error_kind}"
        )
    store.close()
    if simulator is not None:
        simulator.close()


if __name__ == "__main__":
    main()
