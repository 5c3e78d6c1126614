"""llm-batch-queue: durable, rate-limited, multi-stage LLM job queues.

The core imports no database driver, SDK or template engine; `llm_batch_queue.store.sql`,
`llm_batch_queue.adapters.gemini` and `llm_batch_queue.notify` do.
"""

from llm_batch_queue.adapters.base import ModelAdapter, ModelRequest, ModelResponse, Usage
from llm_batch_queue.clock import Clock, FakeClock, SystemClock
from llm_batch_queue.dispatch import Dispatcher, DispatcherSettings, DispatchStats
from llm_batch_queue.errors import (
    CallError,
    ConfigError,
    ErrorKind,
    InvalidOutput,
    LeaseLost,
    LLMBatchQueueError,
    ModelNotFound,
    PermanentError,
    QuotaScope,
    RateLimited,
    RequestTooLarge,
    TooLarge,
    TransientError,
)
from llm_batch_queue.jobs import ItemStatus, JobStatus, NewItem, RunStatus, Scope
from llm_batch_queue.limits import ModelLimits
from llm_batch_queue.limits_config import limits_from_env, load_limits
from llm_batch_queue.pipeline import ModelStage, Pipeline, Prompt, StageContext, TaskStage
from llm_batch_queue.retry import RetryPolicy
from llm_batch_queue.store import MemoryStore, Store

__all__ = [
    "CallError",
    "Clock",
    "ConfigError",
    "DispatchStats",
    "Dispatcher",
    "DispatcherSettings",
    "ErrorKind",
    "FakeClock",
    "InvalidOutput",
    "ItemStatus",
    "JobStatus",
    "LLMBatchQueueError",
    "LeaseLost",
    "MemoryStore",
    "ModelAdapter",
    "ModelLimits",
    "ModelNotFound",
    "ModelRequest",
    "ModelResponse",
    "ModelStage",
    "NewItem",
    "PermanentError",
    "Pipeline",
    "Prompt",
    "QuotaScope",
    "RateLimited",
    "RequestTooLarge",
    "RetryPolicy",
    "RunStatus",
    "Scope",
    "StageContext",
    "Store",
    "SystemClock",
    "TaskStage",
    "TooLarge",
    "TransientError",
    "Usage",
    "limits_from_env",
    "load_limits",
]
