"""ledger_entries.cached_prompt_tokens: a usage entry's prompt tokens served from the worker's prefix
cache (billed at the model's cached prompt price); NULL for other entries and for entries projected
before it existed.

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("ledger_entries", sa.Column("cached_prompt_tokens", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("ledger_entries", "cached_prompt_tokens")
