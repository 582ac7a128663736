"""Initial schema: tenants, api_keys, grants, ledger_events, ledger_entries, balances, projector_offsets.

The ledger tables are append-only: a trigger refuses UPDATE and DELETE on them.

Revision ID: 0001
Revises:
Create Date: 2026-11-23 12:57:01.946913
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

APPEND_ONLY_TABLES = ("ledger_events", "ledger_entries")

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create every table, then the append-only triggers."""
    op.create_table(
        "balances",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("overage", sa.BigInteger(), nullable=False),
        sa.Column("as_of_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_balances")),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("sequence", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("entry_id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("entry_type", sa.Text(), nullable=False),
        sa.Column("occurred_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=True),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("source_topic", sa.Text(), nullable=False),
        sa.Column("source_partition", sa.Integer(), nullable=False),
        sa.Column("source_offset", sa.BigInteger(), nullable=False),
        sa.Column("recorded_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("sequence", name=op.f("pk_ledger_entries")),
        sa.UniqueConstraint("entry_id", name=op.f("uq_ledger_entries_entry_id")),
    )
    op.create_index(
        op.f("ix_ledger_entries_tenant_id_sequence"),
        "ledger_entries",
        ["tenant_id", "sequence"],
        unique=False,
    )
    op.create_table(
        "ledger_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("occurred_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("source_topic", sa.Text(), nullable=False),
        sa.Column("source_partition", sa.Integer(), nullable=False),
        sa.Column("source_offset", sa.BigInteger(), nullable=False),
        sa.Column("recorded_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_ledger_events")),
    )
    op.create_index(
        op.f("ix_ledger_events_tenant_id_occurred_at_ms"),
        "ledger_events",
        ["tenant_id", "occurred_at_ms"],
        unique=False,
    )
    op.create_table(
        "projector_offsets",
        sa.Column("projector_name", sa.Text(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("next_offset", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("next_offset >= 0", name=op.f("ck_projector_offsets_next_offset_non_negative")),
        sa.PrimaryKeyConstraint("projector_name", "topic", "partition", name=op.f("pk_projector_offsets")),
    )
    op.create_table(
        "tenants",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("tier", sa.Text(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("length(name) BETWEEN 1 AND 200", name=op.f("ck_tenants_name_length")),
        sa.CheckConstraint("length(tier) BETWEEN 1 AND 64", name=op.f("ck_tenants_tier_length")),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_tenants")),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("prefix", sa.Text(), nullable=False),
        sa.Column("secret_sha256", sa.LargeBinary(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at_ms", sa.BigInteger(), nullable=True),
        sa.CheckConstraint("octet_length(secret_sha256) = 32", name=op.f("ck_api_keys_secret_sha256_length")),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.tenant_id"],
            name=op.f("fk_api_keys_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("prefix", name=op.f("uq_api_keys_prefix")),
    )
    op.create_index(op.f("ix_api_keys_tenant_id"), "api_keys", ["tenant_id"], unique=False)
    op.create_table(
        "grants",
        sa.Column("grant_id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("effective_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column("request_sha256", sa.LargeBinary(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("published_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("voided_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("void_event_id", sa.Text(), nullable=True),
        sa.Column("void_published_at_ms", sa.BigInteger(), nullable=True),
        sa.CheckConstraint(
            "(voided_at_ms IS NULL) = (void_event_id IS NULL)", name=op.f("ck_grants_void_complete")
        ),
        sa.CheckConstraint("amount > 0", name=op.f("ck_grants_amount_positive")),
        sa.CheckConstraint(
            "expires_at_ms IS NULL OR expires_at_ms > effective_at_ms",
            name=op.f("ck_grants_expiry_after_effective"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_grants_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("grant_id", name=op.f("pk_grants")),
        sa.UniqueConstraint("event_id", name=op.f("uq_grants_event_id")),
        sa.UniqueConstraint("tenant_id", "idempotency_key", name=op.f("uq_grants_tenant_id_idempotency_key")),
        sa.UniqueConstraint("void_event_id", name=op.f("uq_grants_void_event_id")),
    )
    op.create_index(op.f("ix_grants_tenant_id"), "grants", ["tenant_id"], unique=False)
    op.execute(
        """
        CREATE FUNCTION refuse_change_to_append_only_table() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP;
        END
        $$
        """
    )
    for table in APPEND_ONLY_TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION refuse_change_to_append_only_table()"
        )


def downgrade() -> None:
    """Drop everything upgrade created."""
    for table in APPEND_ONLY_TABLES:
        op.execute(f"DROP TRIGGER {table}_append_only ON {table}")
    op.execute("DROP FUNCTION refuse_change_to_append_only_table()")
    op.drop_index(op.f("ix_grants_tenant_id"), table_name="grants")
    op.drop_table("grants")
    op.drop_index(op.f("ix_api_keys_tenant_id"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
    op.drop_table("projector_offsets")
    op.drop_index(op.f("ix_ledger_events_tenant_id_occurred_at_ms"), table_name="ledger_events")
    op.drop_table("ledger_events")
    op.drop_index(op.f("ix_ledger_entries_tenant_id_sequence"), table_name="ledger_entries")
    op.drop_table("ledger_entries")
    op.drop_table("balances")
