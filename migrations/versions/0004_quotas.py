"""quotas: per-session limits on tokens per day and jobs queued or running

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 22:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "quotas",
        sa.Column("session", sa.String(length=128), nullable=False),
        sa.Column("tokens_per_day", sa.BigInteger(), nullable=True),
        sa.Column("max_queued", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("session", name=op.f("pk_quotas")),
    )


def downgrade() -> None:
    op.drop_table("quotas")
