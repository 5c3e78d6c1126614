"""The claim order as one index: status, priority descending, fair_key, next_run_at, id.

Revision ID: 0004
Revises: 0003
Create Date: 2026-04-01

With 0002's (status, priority, fair_key) a claim's ORDER BY priority DESC, fair_key, ... could
not be read off the index, so every claim sorted all the queue's ready jobs (35 ms at 20,000,
spilling to disk); with this one it reads the batch and stops.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_lbq_jobs_status_priority_fair_key", table_name="lbq_jobs")
    op.create_index(
        "ix_lbq_jobs_claim_order",
        "lbq_jobs",
        ["status", sa.text("priority DESC"), "fair_key", "next_run_at", "id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_lbq_jobs_claim_order", table_name="lbq_jobs")
    op.create_index(
        "ix_lbq_jobs_status_priority_fair_key",
        "lbq_jobs",
        ["status", "priority", "fair_key"],
        unique=False,
    )
