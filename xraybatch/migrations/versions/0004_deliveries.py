"""Deliveries: one row per output and destination (C-STORE / STOW-RS), for exactly-once delivery.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("output_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.Text(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("verified", sa.String(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claimed_by", sa.String(), nullable=True),
        sa.Column("claim_expires_at", _utc(), nullable=True),
        sa.Column("next_attempt_at", _utc(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("last_attempt_at", _utc(), nullable=True),
        sa.Column("sent_at", _utc(), nullable=True),
        sa.ForeignKeyConstraint(
            ["output_id"], ["outputs.id"], name="fk_deliveries_output_id_outputs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_deliveries"),
        sa.UniqueConstraint("output_id", "destination", name="uq_deliveries_output_id_destination"),
    )
    op.create_index("ix_deliveries_destination_state", "deliveries", ["destination", "state"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_destination_state", table_name="deliveries")
    op.drop_table("deliveries")
