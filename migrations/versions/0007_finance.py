"""Finance: ledger_movements (every entry's movements, summed by statements), grant_terms (each grant's
money terms as the fold accepted them), the money terms of grants and the tenant's overage rate.

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ledger_movements",
        sa.Column("entry_id", sa.Text(), nullable=False),
        sa.Column("row", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("booked_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("own_time_ms", sa.BigInteger(), nullable=False),
        sa.Column("section", sa.Text(), nullable=False),
        sa.Column("adjustment", sa.Boolean(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("grant_id", sa.Text(), nullable=False),
        sa.Column("credits", sa.BigInteger(), nullable=False),
        sa.Column("money", sa.BigInteger(), nullable=False),
        sa.Column("overage", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cause_event_id", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("entry_id", "row", name=op.f("pk_ledger_movements")),
    )
    op.create_index(
        op.f("ix_ledger_movements_tenant_id_booked_at_ms"), "ledger_movements", ["tenant_id", "booked_at_ms"]
    )
    op.create_index(op.f("ix_ledger_movements_booked_at_ms"), "ledger_movements", ["booked_at_ms"])
    op.create_table(
        "grant_terms",
        sa.Column("grant_id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("category", sa.Text(), nullable=False),
        sa.Column("price", sa.BigInteger(), nullable=True),
        sa.Column("currency", sa.Text(), nullable=True),
        sa.Column("reference", sa.Text(), nullable=False),
        sa.Column("terms", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.PrimaryKeyConstraint("grant_id", name=op.f("pk_grant_terms")),
    )
    op.create_index(op.f("ix_grant_terms_tenant_id"), "grant_terms", ["tenant_id"])
    op.add_column("ledger_entries", sa.Column("booked_at_ms", sa.BigInteger(), nullable=True))
    op.add_column("ledger_entries", sa.Column("credits", sa.BigInteger(), nullable=True))
    op.add_column("ledger_entries", sa.Column("money", sa.BigInteger(), nullable=True))
    op.add_column("ledger_entries", sa.Column("model", sa.Text(), nullable=True))
    op.add_column("ledger_entries", sa.Column("adjustment", sa.Boolean(), nullable=True))
    op.create_index(op.f("ix_ledger_entries_booked_at_ms"), "ledger_entries", ["booked_at_ms"])
    op.create_table(
        "ledger_movement_days",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("day", sa.BigInteger(), nullable=False),
        sa.Column("section", sa.Text(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("grant_id", sa.Text(), nullable=False),
        sa.Column("credits", sa.BigInteger(), nullable=False),
        sa.Column("money", sa.BigInteger(), nullable=False),
        sa.Column("overage", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant_id", "day", "section", "model", "grant_id", name=op.f("pk_ledger_movement_days")
        ),
    )
    op.add_column("tenants", sa.Column("overage_rate_per_million_credits", sa.BigInteger(), nullable=True))
    op.add_column("tenants", sa.Column("overage_currency", sa.Text(), nullable=True))
    op.add_column("grants", sa.Column("category", sa.Text(), server_default="promotional", nullable=False))
    op.add_column("grants", sa.Column("price", sa.BigInteger(), nullable=True))
    op.add_column("grants", sa.Column("currency", sa.Text(), nullable=True))
    op.add_column("grants", sa.Column("reference", sa.Text(), server_default="", nullable=False))


def downgrade() -> None:
    op.drop_table("ledger_movement_days")
    op.drop_index(op.f("ix_ledger_entries_booked_at_ms"), "ledger_entries")
    for column in ("adjustment", "model", "money", "credits", "booked_at_ms"):
        op.drop_column("ledger_entries", column)
    for column in ("reference", "currency", "price", "category"):
        op.drop_column("grants", column)
    op.drop_column("tenants", "overage_currency")
    op.drop_column("tenants", "overage_rate_per_million_credits")
    op.drop_table("grant_terms")
    op.drop_table("ledger_movements")
