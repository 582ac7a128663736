"""Strict admission: the tenant's owner row (admission_accounts) and the open holds (admission_holds).

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "admission_accounts",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("applied_offset", sa.BigInteger(), nullable=False),
        sa.Column("as_of_ms", sa.BigInteger(), nullable=False),
        sa.Column("expiring", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_admission_accounts")),
    )
    op.create_table(
        "admission_holds",
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("finished_at_ms", sa.BigInteger(), nullable=True),
        sa.CheckConstraint("amount >= 0", name=op.f("ck_admission_holds_amount_non_negative")),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_admission_holds")),
    )
    op.create_index(op.f("ix_admission_holds_tenant_id"), "admission_holds", ["tenant_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_admission_holds_tenant_id"), table_name="admission_holds")
    op.drop_table("admission_holds")
    op.drop_table("admission_accounts")
