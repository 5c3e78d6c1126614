"""The core stays free of heavy dependencies; only adapters, stores and notify import them."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_core_pulls_in_no_driver_sdk_or_template_engine() -> None:
    code = (
        "import sys, llm_batch_queue;"
        "print(','.join(m for m in ('sqlalchemy', 'google.genai', 'jinja2', 'openpyxl', 'httpx2')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api_is_exactly_what_all_lists() -> None:
    import llm_batch_queue

    exported = {n for n in dir(llm_batch_queue) if not n.startswith("_")}
    modules = {n for n in exported if type(getattr(llm_batch_queue, n)).__name__ == "module"}
    assert exported - modules == set(llm_batch_queue.__all__)
