"""The control plane's model routes (alias -> stable and canary versions), storage.conversations.ModelRoute.

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_routes",
        sa.Column("alias", sa.Text(), nullable=False),
        sa.Column("stable_model", sa.Text(), nullable=False),
        sa.Column("canary_model", sa.Text(), nullable=True),
        sa.Column("canary_percent", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("alias", name="pk_model_routes"),
    )


def downgrade() -> None:
    op.drop_table("model_routes")
