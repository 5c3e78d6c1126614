"""The rate ledger as counters per window slot and per provider day, not a row per request.

Revision ID: 0003
Revises: 0002
Create Date: 2026-03-01

At a few thousand requests a second a row per booking made every admission read tens of
thousands of rows; a row per model and 0.1-s slot (limits.SLOTS_PER_S) keeps it to at most a
few hundred, and a claim books all its jobs with one write per model.

The last 26 hours of bookings are carried over into slots; the per-day counters start empty,
because the day's time zone belongs to each dispatcher's limits, not to the database: a model
with a requests-per-day limit may be booked up to that limit again on the day of the upgrade.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "lbq_rate_slots",
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("slot", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("open", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("model", "slot", name=op.f("pk_lbq_rate_slots")),
    )
    op.create_table(
        "lbq_rate_days",
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("day", sa.Double(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("model", "day", name=op.f("pk_lbq_rate_days")),
    )
    # slot = the first 0.1-s boundary at or after the booking (limits.window_slot); a CASE
    # rather than ceil(), which SQLite builds may lack
    tenths = "CAST(at * 10 AS BIGINT)"
    slot = f"CASE WHEN {tenths} < at * 10 THEN {tenths} + 1 ELSE {tenths} END"
    op.execute(
        "INSERT INTO lbq_rate_slots (model, slot, requests, tokens, open)"
        f" SELECT model, {slot}, count(*), sum(tokens), sum(CASE WHEN open THEN 1 ELSE 0 END)"
        " FROM lbq_rate_ledger"
        " WHERE at > (SELECT max(at) FROM lbq_rate_ledger) - 26 * 3600"
        f" GROUP BY model, {slot}"
    )
    op.drop_index(op.f("ix_lbq_rate_ledger_model_at"), table_name="lbq_rate_ledger")
    op.drop_table("lbq_rate_ledger")


def downgrade() -> None:
    op.create_table(
        "lbq_rate_ledger",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("open", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lbq_rate_ledger")),
    )
    op.create_index(
        op.f("ix_lbq_rate_ledger_model_at"), "lbq_rate_ledger", ["model", "at"], unique=False
    )
    # one row per slot, standing for its requests (the per-request detail is gone)
    op.execute(
        "INSERT INTO lbq_rate_ledger (model, at, tokens, open)"
        " SELECT model, slot / 10.0, tokens, open > 0 FROM lbq_rate_slots"
    )
    op.drop_table("lbq_rate_days")
    op.drop_table("lbq_rate_slots")
