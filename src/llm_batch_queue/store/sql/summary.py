"""Store.run_summary in SQL: four aggregate queries over one run's rows, in one read."""

from __future__ import annotations

from sqlalchemy import Connection, func, select

from llm_batch_queue.jobs import Run
from llm_batch_queue.store.sql import graph
from llm_batch_queue.store.sql.tables import attempts, items, jobs, outbox
from llm_batch_queue.summary import AttemptGroup, RunSummary, summarize


def run_summary(conn: Connection, run: Run, spec: graph.RunSpec) -> RunSummary:
    failures = conn.scalar(
        select(func.coalesce(func.sum(items.c.failures), 0)).where(items.c.run_id == run.id)
    )
    a = attempts.c
    grouped = conn.execute(
        select(
            a.stage,
            a.model,
            a.is_fallback,
            a.error_kind,
            func.count(),
            func.sum(a.input_tokens),
            func.sum(a.output_tokens),
            func.sum(a.thinking_tokens),
            func.min(a.started_at),
            func.max(a.finished_at),
        )
        .join(jobs, jobs.c.id == a.job_id)
        .where(jobs.c.run_id == run.id)
        .group_by(a.stage, a.model, a.is_fallback, a.error_kind)
    )
    groups = [
        AttemptGroup(
            stage,
            model,
            bool(fallback),
            kind,
            int(n),
            int(tokens_in),
            int(tokens_out),
            int(thinking),
            float(first),
            float(last),
        )
        for stage, model, fallback, kind, n, tokens_in, tokens_out, thinking, first, last in grouped
    ]
    notes = {
        status: int(n)
        for status, n in conn.execute(
            select(outbox.c.status, func.count())
            .where(outbox.c.run_id == run.id)
            .group_by(outbox.c.status)
        )
    }
    counts = graph.counts(conn, run.id)
    return summarize(run, spec.stages, counts, int(failures or 0), groups, notes)
