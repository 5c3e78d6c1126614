"""Runs record when the retention purge cleared their payloads and outputs.

Revision ID: 0006
Revises: 0005
Create Date: 2026-04-10

Plain ALTER TABLE on SQLite too, as in 0002: batch mode would copy lbq_runs and drop the
original, and with foreign keys on that would cascade to every item, job and attempt.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("lbq_runs", sa.Column("purged_at", sa.Double(), nullable=True))


def downgrade() -> None:
    op.drop_column("lbq_runs", "purged_at")
