"""Fair claim order across runs: lbq_jobs.fair_key and an index for the claim query.

Revision ID: 0002
Revises: 0001
Create Date: 2026-02-01

Claims go by priority, then fair_key (start-time fair queueing, see jobs.Job.fair_key). The
column comes with a server default, so the rows already there get 0; then the jobs of runs
created before this revision are given the keys they would have had if created with nothing
else queued (their item's position, or the number of items for run-scope jobs), so that their
items still progress in order and share turns with runs created later.

Plain ALTER TABLE statements on SQLite too (ADD COLUMN, and DROP COLUMN from SQLite 3.35):
batch mode would copy lbq_jobs and drop the original, and with foreign keys on, dropping it
would cascade to lbq_attempts.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_lbq_jobs_status_priority_fair_key"


def upgrade() -> None:
    op.add_column(
        "lbq_jobs",
        sa.Column("fair_key", sa.Double(), server_default=sa.text("0"), nullable=False),
    )
    op.execute(
        "UPDATE lbq_jobs SET fair_key = (SELECT i.position FROM lbq_items i"
        " WHERE i.id = lbq_jobs.item_id) WHERE item_id IS NOT NULL"
    )
    op.execute(
        "UPDATE lbq_jobs SET fair_key = (SELECT count(*) FROM lbq_items i"
        " WHERE i.run_id = lbq_jobs.run_id) WHERE item_id IS NULL"
    )
    op.create_index(op.f(INDEX), "lbq_jobs", ["status", "priority", "fair_key"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f(INDEX), table_name="lbq_jobs")
    op.drop_column("lbq_jobs", "fair_key")
