"""The Elevra pipeline as a worker for `llm-batch-queue worker`:

    llm-batch-queue worker --app examples.elevra_upload.worker:app --db postgresql://...

Settings come from the environment as for the app's own commands (config.py), plus ELEVRA_OUT
for the workbooks and e-mail log (default elevra-out). Without GEMINI_API_KEY each worker
answers from an offline simulator of its own, unless ELEVRA_GEMINI_BASE_URL names a shared one.
`python -m examples.elevra_upload worker` runs the same thing.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from examples.elevra_upload.app import open_app
from examples.elevra_upload.config import AppConfig
from llm_batch_queue.errors import ConfigError
from llm_batch_queue.store.base import Store
from llm_batch_queue.store.sql import SQLStore
from llm_batch_queue.worker import WorkerApp


def app(store: Store) -> WorkerApp:
    if not isinstance(store, SQLStore):
        raise ConfigError("the Elevra app keeps its election tables in the queue's SQL database")
    config = AppConfig.from_env(os.environ)
    out = Path(os.environ.get("ELEVRA_OUT", "elevra-out"))
    url = store.engine.url.render_as_string(hide_password=False)
    stack = ExitStack()
    elevra = stack.enter_context(
        open_app(config, out, url, simulate=not config.api_key, store=store)
    )
    parts = elevra.worker_app()

    async def close() -> None:
        try:
            if parts.close is not None:
                await parts.close()
        finally:
            stack.close()

    return replace(parts, close=close)
