"""The outbox keeps the id the transport returned; rows may now be `sending` or `in_doubt`.

Revision ID: 0005
Revises: 0004
Create Date: 2026-04-10

Statuses are plain strings, so the two new ones (a claimed row is `sending` until it is marked;
one whose sender stopped before marking it is `in_doubt`) need no schema change. Rows a sender of
the old code had claimed are `pending` with a pushed next_attempt_at, which the new code reads as
it did: due once the hold has passed. A plain ALTER TABLE on SQLite too (see 0002).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("lbq_outbox", sa.Column("provider_id", sa.Text(), nullable=True))


def downgrade() -> None:
    # the old code knows neither status: a claimed row goes back to what the old code's claim
    # left (pending, due after the hold); one in doubt to failed, so it is still not sent twice
    op.execute("UPDATE lbq_outbox SET status = 'pending' WHERE status = 'sending'")
    op.execute("UPDATE lbq_outbox SET status = 'failed' WHERE status = 'in_doubt'")
    op.drop_column("lbq_outbox", "provider_id")
