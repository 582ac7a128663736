"""Credits scoped to models: a grant names the models its credit pays for (CreditGranted.models).
grants (the admin API's record, from which the event is published) and grant_terms (the fold's
GrantRecorded, projected) carry `models`; existing rows: none, any model.

Revision ID: 0013
Revises: 0012
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("grants", "grant_terms")


def upgrade() -> None:
    for table in TABLES:
        op.add_column(
            table,
            sa.Column("models", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        )


def downgrade() -> None:
    for table in TABLES:
        op.drop_column(table, "models")
