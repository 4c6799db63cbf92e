"""Initial schema: instances, predictions, outputs, model_versions.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Hand-checked against xraybatch/db/tables.py; tests/integration/test_migrations.py compares them on SQLite and
on PostgreSQL. Migrations never import xraybatch: they are frozen at the schema of their revision.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# At most one live row per SOP Instance UID; duplicate, rejected and failed rows may repeat.
LIVE_WHERE = "state IN ('queued', 'processing', 'done', 'not_applicable')"


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(), nullable=True),
        sa.Column("study_instance_uid", sa.String(), nullable=True),
        sa.Column("series_instance_uid", sa.String(), nullable=True),
        sa.Column("sop_class_uid", sa.String(), nullable=True),
        sa.Column("accession_number", sa.String(), nullable=True),
        sa.Column("patient_id", sa.String(), nullable=True),
        sa.Column("modality", sa.String(), nullable=True),
        sa.Column("body_part", sa.String(), nullable=True),
        sa.Column("view_position", sa.String(), nullable=True),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("notes", sa.JSON(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(), nullable=True),
        sa.Column("lease_expires_at", _utc(), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.Column("model_set", sa.Text(), nullable=False),
        sa.Column("received_at", _utc(), nullable=False),
        sa.Column("started_at", _utc(), nullable=True),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_instances"),
    )
    for column in (
        "accession_number",
        "finished_at",
        "received_at",
        "sop_instance_uid",
        "state",
        "study_instance_uid",
    ):
        op.create_index(f"ix_instances_{column}", "instances", [column])
    op.create_index(
        "uq_instances_live_sop",
        "instances",
        ["sop_instance_uid"],
        unique=True,
        sqlite_where=sa.text(LIVE_WHERE),
        postgresql_where=sa.text(LIVE_WHERE),
    )

    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("probability", sa.Double(), nullable=False),
        sa.Column("threshold", sa.Double(), nullable=False),
        sa.Column("positive", sa.Boolean(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name="fk_predictions_instance_id_instances", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_predictions"),
    )
    op.create_index("ix_predictions_instance_id", "predictions", ["instance_id"])
    op.create_index("ix_predictions_created_at", "predictions", ["created_at"])
    op.create_index("ix_predictions_target_positive", "predictions", ["target", "positive"])
    op.create_index("ix_predictions_model_name_model_version", "predictions", ["model_name", "model_version"])

    op.create_table(
        "outputs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(), nullable=False),
        sa.Column("series_instance_uid", sa.String(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sent_state", sa.String(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name="fk_outputs_instance_id_instances", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_outputs"),
        sa.UniqueConstraint("sop_instance_uid", name="uq_outputs_sop_instance_uid"),
    )
    op.create_index("ix_outputs_instance_id", "outputs", ["instance_id"])

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("version", sa.String(), nullable=False),
        sa.Column("task", sa.String(), nullable=False),
        sa.Column("architecture", sa.String(), nullable=False),
        sa.Column("sha256", sa.String(), nullable=False),
        sa.Column("targets", sa.JSON(), nullable=False),
        sa.Column("thresholds", sa.JSON(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("registered_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
        sa.UniqueConstraint("name", "version", "sha256", name="uq_model_versions_name_version_sha256"),
    )


def downgrade() -> None:
    # Dropping a table drops its indexes; children before parents for the foreign keys.
    for table in ("model_versions", "outputs", "predictions", "instances"):
        op.drop_table(table)
