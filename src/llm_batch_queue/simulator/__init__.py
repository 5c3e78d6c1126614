"""An offline Gemini-compatible HTTP server with quotas, faults and counters (stdlib only)."""

from llm_batch_queue.simulator.config import FaultConfig, ModelConfig, parse_model_spec
from llm_batch_queue.simulator.faults import Fault
from llm_batch_queue.simulator.quota import QuotaKind
from llm_batch_queue.simulator.responder import Responder, SimRequest, lorem_responder
from llm_batch_queue.simulator.schema import minimal_instance
from llm_batch_queue.simulator.server import Simulator
from llm_batch_queue.simulator.stats import ModelStats

__all__ = [
    "Fault",
    "FaultConfig",
    "ModelConfig",
    "ModelStats",
    "QuotaKind",
    "Responder",
    "SimRequest",
    "Simulator",
    "lorem_responder",
    "minimal_instance",
    "parse_model_spec",
]
