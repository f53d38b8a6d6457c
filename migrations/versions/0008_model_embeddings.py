"""models that serve embeddings: the flag, the pooling, normalisation and allowed dimensions

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 02:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("embedding", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(sa.Column("pooling", sa.String(length=8), nullable=True))
        batch_op.add_column(
            sa.Column("normalize", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
        batch_op.add_column(sa.Column("dimensions", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("dimensions")
        batch_op.drop_column("normalize")
        batch_op.drop_column("pooling")
        batch_op.drop_column("embedding")
