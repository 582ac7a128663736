"""audit_snapshots: per-tenant snapshots of the fold for point-in-time questions (storage.snapshots), and
the index they read ledger_events through (a tenant's events in knowledge order).

Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_snapshots",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("known_through_ms", sa.BigInteger(), nullable=False),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.Column("account", sa.LargeBinary(), nullable=False),
        sa.Column("usage", sa.LargeBinary(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "known_through_ms", name="pk_audit_snapshots"),
    )
    op.create_index(
        "ix_ledger_events_tenant_id_known",
        "ledger_events",
        ["tenant_id", sa.text("coalesce(known_at_ms, recorded_at_ms)"), "event_id"],
    )


def downgrade() -> None:
    op.drop_index("ix_ledger_events_tenant_id_known", table_name="ledger_events")
    op.drop_table("audit_snapshots")
