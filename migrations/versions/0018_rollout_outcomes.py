"""The canary's window shared by every gateway: rollout_outcomes (storage.conversations.RolloutOutcome).

Revision ID: 0018
Revises: 0016
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | Sequence[str] | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rollout_outcomes",
        sa.Column("outcome_id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("alias", sa.Text(), nullable=False),
        sa.Column("at_ms", sa.BigInteger(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("failed", sa.Boolean(), nullable=False),
        sa.Column("ttft_ms", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("outcome_id", name="pk_rollout_outcomes"),
    )
    op.create_index("ix_rollout_outcomes_alias_at_ms", "rollout_outcomes", ["alias", "at_ms"])


def downgrade() -> None:
    op.drop_index("ix_rollout_outcomes_alias_at_ms", table_name="rollout_outcomes")
    op.drop_table("rollout_outcomes")
