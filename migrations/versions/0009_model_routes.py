"""The control plane: model routes (alias -> stable and canary versions) and prompt versions (named system
prompts), storage.conversations.ModelRoute and PromptVersion.

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
    op.create_table(
        "prompt_versions",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("version", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", "version", name="pk_prompt_versions"),
    )


def downgrade() -> None:
    op.drop_table("prompt_versions")
    op.drop_table("model_routes")
