"""One queue for every source: where a row came from, and copies that wait for their first copy.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

- ``instances.source``: ``watch`` for a file taken from a drop folder (moved to archive/quarantine afterwards),
  ``run-folder:<folder>`` for a file of a ``run-folder`` run (left in place). Existing rows are ``watch`` rows,
  except the rows the old ``run-folder`` wrote (no ``file_path``), which become ``run-folder:``.
- The live unique index holds a SOP Instance UID only once it is ``done`` or ``not_applicable``: queued copies
  of one instance may wait side by side, and the first one to end ``done`` makes the others duplicates.
  (That only one copy is ``processing`` at a time is the claim's job: claims take turns.)
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_WHERE = "state IN ('queued', 'processing', 'done', 'not_applicable')"
NEW_WHERE = "state IN ('done', 'not_applicable')"
INDEX = "uq_instances_live_sop_model"


def _index(where: str) -> None:
    op.create_index(
        INDEX, "instances", ["sop_instance_uid", "model_set"], unique=True,
        sqlite_where=sa.text(where), postgresql_where=sa.text(where),
    )


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("source", sa.Text(), nullable=False, server_default="watch"))
    op.execute("UPDATE instances SET source = 'run-folder:' WHERE file_path IS NULL")
    op.create_index("ix_instances_source_state", "instances", ["source", "state"])
    op.drop_index(INDEX, table_name="instances")
    _index(NEW_WHERE)


def downgrade() -> None:
    # Copies that wait side by side cannot all stay queued under the old index: the later ones become duplicates.
    op.execute(
        "UPDATE instances SET state = 'duplicate', reason = 'SOP Instance UID already received (downgrade)' "
        "WHERE state IN ('queued', 'processing') AND EXISTS (SELECT 1 FROM instances AS other "
        "WHERE other.sop_instance_uid = instances.sop_instance_uid AND other.model_set = instances.model_set "
        "AND other.id < instances.id AND other.state IN ('queued', 'processing', 'done', 'not_applicable'))"
    )
    op.drop_index(INDEX, table_name="instances")
    _index(OLD_WHERE)
    op.drop_index("ix_instances_source_state", table_name="instances")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("source")
