"""Daemon support: where each file is now, a heartbeat table, and the model set in the idempotency key.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

- ``instances.file_path``: the file's current location (in-flight, archive or quarantine; NULL when deleted).
- ``workers``: one row per ``xraybatch watch`` process, with a heartbeat, for ``xraybatch status``.
- The live unique index now covers (sop_instance_uid, model_set): a second copy of an instance is a duplicate
  for the same models, and an explicit ``xraybatch reprocess`` with new models can process it again.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIVE_WHERE = "state IN ('queued', 'processing', 'done', 'not_applicable')"


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("file_path", sa.Text(), nullable=True))
    op.drop_index("uq_instances_live_sop", table_name="instances")
    op.create_index(
        "uq_instances_live_sop_model",
        "instances",
        ["sop_instance_uid", "model_set"],
        unique=True,
        sqlite_where=sa.text(LIVE_WHERE),
        postgresql_where=sa.text(LIVE_WHERE),
    )
    op.create_index("ix_instances_lease_expires_at", "instances", ["lease_expires_at"])
    op.create_table(
        "workers",
        sa.Column("worker_id", sa.String(), nullable=False),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("incoming", sa.Text(), nullable=False),
        sa.Column("model_set", sa.Text(), nullable=False),
        sa.Column("started_at", _utc(), nullable=False),
        sa.Column("last_seen", _utc(), nullable=False),
        sa.Column("stopped_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("worker_id", name="pk_workers"),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_index("ix_instances_lease_expires_at", table_name="instances")
    op.drop_index("uq_instances_live_sop_model", table_name="instances")
    op.create_index(
        "uq_instances_live_sop",
        "instances",
        ["sop_instance_uid"],
        unique=True,
        sqlite_where=sa.text(LIVE_WHERE),
        postgresql_where=sa.text(LIVE_WHERE),
    )
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("file_path")
