"""llm-batch-queue."""
