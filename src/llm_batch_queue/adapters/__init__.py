"""Model adapters. `base` is dependency-free; `gemini` imports google-genai."""

from llm_batch_queue.adapters.base import ModelAdapter, ModelRequest, ModelResponse, Usage

__all__ = ["ModelAdapter", "ModelRequest", "ModelResponse", "Usage"]
