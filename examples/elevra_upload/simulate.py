"""Offline mode: the Gemini simulator answering with replies derived from the prompt's rows.

The simulated model researches nothing: it echoes what the spreadsheet says, and its analysis
says so. Everything else (SDK, HTTP, quotas, queue, database, workbook, e-mails) is real.
"""

from __future__ import annotations

from collections.abc import Mapping

from examples.elevra_upload.responder import respond
from llm_batch_queue.limits import ModelLimits
from llm_batch_queue.simulator import FaultConfig, ModelConfig, SimRequest, Simulator


def reply(request: SimRequest) -> str:
    """The simulator's answer to one of the app's prompts. A shared simulator for several
    workers: `python -m llm_batch_queue.simulator --responder examples.elevra_upload.simulate:reply
    --model gemini-2.5-pro --model gemini-2.5-flash --model gemini-2.5-flash-lite`."""
    return respond(request.model, request.prompt, request.wants_json)


def start_simulator(
    limits: Mapping[str, ModelLimits],
    models: set[str],
    *,
    latency_s: tuple[float, float] = (0.02, 0.15),
    seed: int = 0,
) -> Simulator:
    """Serve every model the pipeline uses, enforcing the same limits the dispatcher plans for."""
    configs = {}
    for model in sorted(models):
        lim = limits.get(model, ModelLimits())
        configs[model] = ModelConfig(
            rpm=lim.rpm, tpm=lim.tpm, rpd=lim.rpd, faults=FaultConfig(latency_s=latency_s)
        )
    return Simulator(configs, responder=reply, seed=seed).start()
