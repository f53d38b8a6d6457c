"""worker slots and threads; cached prompt tokens in usage; a worker's jobs are its usage rows

A worker now runs several jobs at once, so `workers.current_job` gives way to the usage
rows marked running on that worker.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 21:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("slots", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("threads", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("tokens_per_s", sa.Float(), nullable=True))
        batch_op.drop_column("current_job")
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("cached_tokens", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.create_index("ix_usage_worker_id_status", ["worker_id", "status"])
        batch_op.create_index("ix_usage_status_submitted_at", ["status", "submitted_at"])


def downgrade() -> None:
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_status_submitted_at")
        batch_op.drop_index("ix_usage_worker_id_status")
        batch_op.drop_column("cached_tokens")
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("current_job", sa.String(length=64), nullable=True))
        batch_op.drop_column("tokens_per_s")
        batch_op.drop_column("threads")
        batch_op.drop_column("slots")
