"""The control plane: model routes (alias -> stable and canary versions), prompt versions (named system
prompts) and the versions' evaluation scores: storage.conversations.ModelRoute, PromptVersion, ModelEval.

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
    op.create_table(
        "model_evals",
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("eval_set_sha256", sa.Text(), nullable=False),
        sa.Column("cases", sa.BigInteger(), nullable=False),
        sa.Column("passed", sa.BigInteger(), nullable=False),
        sa.Column("evaluated_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("model", "eval_set_sha256", name="pk_model_evals"),
    )


def downgrade() -> None:
    op.drop_table("model_evals")
    op.drop_table("prompt_versions")
    op.drop_table("model_routes")
