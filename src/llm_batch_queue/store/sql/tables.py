"""The SQL schema as SQLAlchemy Core tables; the migrations in `migrations/` must match it.

Times are float epoch seconds (every window, lease and backoff is arithmetic on them). JSON is
JSONB on PostgreSQL. `position` columns keep submission order, which uuid ids cannot.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeEngine

# names for constraints, so migrations and autogenerate agree on every dialect
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Json: TypeEngine[Any] = JSON().with_variant(JSONB(), "postgresql")
# BIGINT on PostgreSQL; SQLite only autoincrements an INTEGER PRIMARY KEY
Serial: TypeEngine[int] = BigInteger().with_variant(Integer(), "sqlite")
Id = String(32)  # uuid4 hex
Time: Double[float] = Double()

runs = Table(
    "lbq_runs",
    metadata,
    Column("id", Id, primary_key=True),
    Column("pipeline", String(200), nullable=False),
    Column("name", Text, nullable=False),
    Column("status", String(32), nullable=False),
    Column("meta", Json),
    # the stage graph as an ordered list, so any process can advance the run
    Column("stages", Json, nullable=False),
    Column("notify", Json, nullable=False),
    Column("created_at", Time, nullable=False),
    Column("finished_at", Time),
    # 1, then +1 each time an admin retry reopens the finished run (milestone keys carry it)
    Column("round", Integer, nullable=False),
    Column("purged_at", Time),  # the retention purge cleared its payloads and outputs
)

items = Table(
    "lbq_items",
    metadata,
    Column("id", Id, primary_key=True),
    Column("run_id", Id, ForeignKey("lbq_runs.id", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("key", Text, nullable=False),
    Column("status", String(32), nullable=False),
    Column("payload", Json),
    Column("outputs", Json, nullable=False),
    Column("error", Text),
    Column("failures", Integer, nullable=False),
    UniqueConstraint("run_id", "key"),
    # room on each page, so status and outputs are updated in place (HOT: no index entries)
    postgresql_with={"fillfactor": 80},
)

jobs = Table(
    "lbq_jobs",
    metadata,
    Column("id", Id, primary_key=True),
    Column("run_id", Id, ForeignKey("lbq_runs.id", ondelete="CASCADE"), nullable=False),
    # NULL for run-scope jobs. One job per item (or run) and stage: create_run, the only
    # writer of jobs, makes them so; a unique index would check it again on every status change
    Column("item_id", Id, ForeignKey("lbq_items.id", ondelete="CASCADE")),
    # read by nothing: the unique index's key until migration 0008, written by earlier workers
    Column("scope_key", Id),
    Column("position", Integer, nullable=False),
    # the run's pipeline, copied so a dispatcher claims only jobs its pipeline can run
    Column("pipeline", String(200), nullable=False),
    Column("stage", String(200), nullable=False),
    Column("status", String(32), nullable=False),
    Column("priority", Integer, nullable=False),
    # claim order after priority (start-time fair queueing across runs, see jobs.Job)
    Column("fair_key", Double, nullable=False, server_default=text("0")),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("next_run_at", Time, nullable=False),
    Column("model_index", Integer, nullable=False),
    Column("model_failures", Integer, nullable=False),
    Column("last_error", Text),
    Column("output", Json),
    Column("lease_token", String(32)),
    Column("lease_expires_at", Time),
    Column("leased_by", String(200)),
    Column("created_at", Time, nullable=False),
    Column("updated_at", Time, nullable=False),
    Index(None, "run_id", "stage", "status"),
    Index(None, "item_id"),
)

# Partial indexes over the few jobs each query looks for: a claim or a finish changes a job's
# status, so every index on the table gets a new entry for it, except partial ones whose
# condition the new row does not meet (a job moving to running or done adds none here).
_READY = text("status = 'ready'")
_RUNNING = text("status = 'running'")
# the claim order (claims._candidate_rows): an index scan that stops after the batch, instead of
# sorting every ready job of the queue on each claim
Index(
    "ix_lbq_jobs_claim_order",
    jobs.c.priority.desc(),
    jobs.c.fair_key,
    jobs.c.next_run_at,
    jobs.c.id,
    postgresql_where=_READY,
    sqlite_where=_READY,
)
# the next due job and the expired leases (claims.next_due, claims._candidate_rows)
Index("ix_lbq_jobs_ready_due", jobs.c.next_run_at, postgresql_where=_READY, sqlite_where=_READY)
Index(
    "ix_lbq_jobs_lease_expiry",
    jobs.c.lease_expires_at,
    postgresql_where=_RUNNING,
    sqlite_where=_RUNNING,
)

attempts = Table(
    "lbq_attempts",
    metadata,
    Column("id", Serial, primary_key=True, autoincrement=True),
    # no foreign key: an attempt is written only by the transaction holding its job's lease,
    # and a key check per row cost half of the attempt's INSERT (migration 0008)
    Column("job_id", Id, nullable=False),
    Column("stage", String(200), nullable=False),
    Column("item_key", Text),
    Column("model", String(200)),
    Column("is_fallback", Boolean, nullable=False),
    Column("started_at", Time, nullable=False),
    Column("finished_at", Time, nullable=False),
    Column("input_tokens", Integer, nullable=False),
    Column("output_tokens", Integer, nullable=False),
    Column("thinking_tokens", Integer, nullable=False),
    Column("status_code", Integer),
    Column("error_kind", String(64)),
    Column("error_message", Text),
    Column("counted", Boolean, nullable=False),
    Index(None, "job_id"),
)

# the rate ledger (limits.py): requests and input tokens booked per model and 0.1-s window slot,
# with those not yet reconciled (open); and requests per model and provider day
rate_slots = Table(
    "lbq_rate_slots",
    metadata,
    Column("model", String(200), primary_key=True),
    Column("slot", BigInteger, primary_key=True, autoincrement=False),
    Column("requests", Integer, nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("open", Integer, nullable=False),
)

rate_days = Table(
    "lbq_rate_days",
    metadata,
    Column("model", String(200), primary_key=True),
    Column("day", Time, primary_key=True),  # the provider day's first instant
    Column("requests", Integer, nullable=False),
)

model_state = Table(
    "lbq_model_state",
    metadata,
    Column("model", String(200), primary_key=True),
    Column("blocked_until", Time, nullable=False),
    Column("reason", Text),
)

outbox = Table(
    "lbq_outbox",
    metadata,
    Column("id", Serial, primary_key=True, autoincrement=True),
    Column("run_id", Id, ForeignKey("lbq_runs.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(64), nullable=False),
    Column("key", Text, nullable=False),
    Column("payload", Json),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("created_at", Time, nullable=False),
    Column("sent_at", Time),
    Column("error", Text),
    # pending: when due; sending: when the sender's hold ends (then the row is in doubt)
    Column("next_attempt_at", Time, nullable=False),
    Column("provider_id", Text),
    UniqueConstraint("run_id", "kind", "key"),
    Index(None, "status", "next_attempt_at"),
)
