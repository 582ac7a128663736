"""ledger_entries.prompt_version: the prompt version (`name@version`, a named system prompt) a usage entry's
request was built with; NULL for other entries, for requests built without one, and for entries projected
before it existed.

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("ledger_entries", sa.Column("prompt_version", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("ledger_entries", "prompt_version")
