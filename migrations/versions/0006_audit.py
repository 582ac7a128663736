"""Audit (storage.audit): the entries' hash-chain columns on ledger_entries, the knowledge time of
events and entries (known_at_ms), the projected checkpoints
(ledger_checkpoints), named admin credentials (admin_credentials) and the admin audit log
(admin_audit_log); the checkpoints and the audit log are append-only (0001's trigger function).

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_ONLY_TABLES = ("ledger_checkpoints", "admin_audit_log")  # a trigger refuses UPDATE and DELETE


def upgrade() -> None:
    op.add_column("ledger_entries", sa.Column("chain_sequence", sa.BigInteger(), nullable=True))
    op.add_column("ledger_entries", sa.Column("chain_hash", sa.Text(), nullable=True))
    op.add_column("ledger_entries", sa.Column("record", sa.LargeBinary(), nullable=True))
    op.add_column("ledger_entries", sa.Column("known_at_ms", sa.BigInteger(), nullable=True))
    op.add_column("ledger_events", sa.Column("known_at_ms", sa.BigInteger(), nullable=True))
    op.create_index(
        "ix_ledger_entries_tenant_id_chain_sequence",
        "ledger_entries",
        ["tenant_id", "chain_sequence"],
        unique=True,
    )
    op.create_table(
        "ledger_checkpoints",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("number", sa.BigInteger(), nullable=False),
        sa.Column("first_sequence", sa.BigInteger(), nullable=False),
        sa.Column("last_sequence", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.Text(), nullable=False),
        sa.Column("merkle_root", sa.Text(), nullable=False),
        sa.Column("stream_time_ms", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.Text(), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.Column("record", sa.LargeBinary(), nullable=False),
        sa.Column("source_partition", sa.Integer(), nullable=False),
        sa.Column("source_offset", sa.BigInteger(), nullable=False),
        sa.Column("recorded_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "number", name="pk_ledger_checkpoints"),
    )
    op.create_index(
        "ix_ledger_checkpoints_tenant_id_last_sequence", "ledger_checkpoints", ["tenant_id", "last_sequence"]
    )
    op.create_table(
        "admin_credentials",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("secret_hash", sa.LargeBinary(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at_ms", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_admin_credentials"),
        sa.CheckConstraint("role IN ('operator', 'finance')", name="ck_admin_credentials_known_role"),
        sa.UniqueConstraint("secret_hash", name="uq_admin_credentials_secret_hash"),
    )
    op.create_table(
        "admin_audit_log",
        sa.Column("sequence", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("at_ms", sa.BigInteger(), nullable=False),
        sa.Column("credential_name", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("details", postgresql.JSONB(), nullable=False),
        sa.Column("event_ids", postgresql.JSONB(), nullable=False),
        sa.Column("chain_previous", sa.Text(), nullable=False),
        sa.Column("chain_hash", sa.Text(), nullable=False),
        sa.Column("record", sa.LargeBinary(), nullable=False),
        sa.Column("checkpoint", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("sequence", name="pk_admin_audit_log"),
        sa.UniqueConstraint("chain_hash", name="uq_admin_audit_log_chain_hash"),
    )
    for table in APPEND_ONLY_TABLES:  # the function is 0001's
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION refuse_change_to_append_only_table()"
        )


def downgrade() -> None:
    for table in APPEND_ONLY_TABLES:
        op.execute(f"DROP TRIGGER {table}_append_only ON {table}")
    op.drop_table("admin_audit_log")
    op.drop_table("admin_credentials")
    op.drop_index("ix_ledger_checkpoints_tenant_id_last_sequence", table_name="ledger_checkpoints")
    op.drop_table("ledger_checkpoints")
    op.drop_index("ix_ledger_entries_tenant_id_chain_sequence", table_name="ledger_entries")
    op.drop_column("ledger_events", "known_at_ms")
    op.drop_column("ledger_entries", "known_at_ms")
    op.drop_column("ledger_entries", "record")
    op.drop_column("ledger_entries", "chain_hash")
    op.drop_column("ledger_entries", "chain_sequence")
