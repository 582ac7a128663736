"""Statements show cached prompt tokens: ledger_movements and ledger_movement_days carry
cached_prompt_tokens (of prompt_tokens, those served from a prefix cache); existing rows 0.

Revision ID: 0012
Revises: 0011
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("ledger_movements", "ledger_movement_days")


def upgrade() -> None:
    for table in TABLES:
        op.add_column(
            table,
            sa.Column("cached_prompt_tokens", sa.BigInteger(), server_default="0", nullable=False),
        )


def downgrade() -> None:
    for table in TABLES:
        op.drop_column(table, "cached_prompt_tokens")
