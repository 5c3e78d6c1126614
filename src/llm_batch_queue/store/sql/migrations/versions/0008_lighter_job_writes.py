"""Fewer index entries and checks on the rows every job writes.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04

Measured on PostgreSQL 15, per row of a 128-row batch: an UPDATE of lbq_jobs' status adds an
entry to every full index, and the unique (run_id, scope_key, stage) index checked each new
entry for duplicates (~6 µs a row of ~21); each attempt row fired a foreign-key check on its job
(~20 µs a row, half the INSERT). Both guarded what nothing can break: create_run is the only
writer of jobs (one per item and stage, the item ids fresh) and of attempts' job ids (an
attempt is written in the transaction that holds its job's lease). So the unique constraint
goes, and so does the attempts' foreign key; lbq_attempts keeps its job_id index. scope_key,
which existed only for that constraint, stays as a nullable column nothing reads: workers of
the previous revision, still running while a fleet is upgraded, keep writing it. lbq_items
gets fillfactor 80, so an item's status and outputs can be updated in place (HOT, no new index
entries) instead of on another page.

SQLite rebuilds both tables (batch mode), lbq_attempts first: dropping the old lbq_jobs deletes
its rows, which with foreign keys on would cascade to the attempts that still referenced it.
The rebuild recreates lbq_jobs' indexes from their reflection, which loses the claim order's
DESC; that index is made again as 0007 made it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ATTEMPT_FK = "fk_lbq_attempts_job_id_lbq_jobs"
UNIQUE = "uq_lbq_jobs_run_id_scope_key_stage"


def upgrade() -> None:
    with op.batch_alter_table("lbq_attempts") as batch:
        batch.drop_constraint(ATTEMPT_FK, type_="foreignkey")
    with op.batch_alter_table("lbq_jobs") as batch:
        batch.drop_constraint(UNIQUE, type_="unique")
        batch.alter_column("scope_key", existing_type=sa.String(32), nullable=True)
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE lbq_items SET (fillfactor = 80)")
    else:
        _claim_order_again()


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE lbq_items RESET (fillfactor)")
    # jobs created since the upgrade have none
    op.execute("UPDATE lbq_jobs SET scope_key = coalesce(item_id, '') WHERE scope_key IS NULL")
    with op.batch_alter_table("lbq_jobs") as batch:
        batch.alter_column("scope_key", existing_type=sa.String(32), nullable=False)
        batch.create_unique_constraint(UNIQUE, ["run_id", "scope_key", "stage"])
    with op.batch_alter_table("lbq_attempts") as batch:
        batch.create_foreign_key(ATTEMPT_FK, "lbq_jobs", ["job_id"], ["id"], ondelete="CASCADE")
    if op.get_context().dialect.name != "postgresql":
        _claim_order_again()


def _claim_order_again() -> None:
    """SQLite's batch rebuild of lbq_jobs: the claim order index as 0007 made it."""
    op.drop_index("ix_lbq_jobs_claim_order", table_name="lbq_jobs")
    op.create_index(
        "ix_lbq_jobs_claim_order",
        "lbq_jobs",
        [sa.text("priority DESC"), "fair_key", "next_run_at", "id"],
        sqlite_where=sa.text("status = 'ready'"),
    )
