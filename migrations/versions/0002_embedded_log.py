"""The embedded event log (log_records, log_partition_heads) and the embedded processor's state.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "log_records",
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("log_offset", sa.BigInteger(), nullable=False),
        sa.Column("key", sa.LargeBinary(), nullable=True),
        sa.Column("value", sa.LargeBinary(), nullable=True),
        sa.Column("timestamp_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("topic", "partition", "log_offset", name="pk_log_records"),
    )
    op.create_table(
        "log_partition_heads",
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("next_offset", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("topic", "partition", name="pk_log_partition_heads"),
        sa.CheckConstraint("next_offset >= 0", name="ck_log_partition_heads_next_offset_non_negative"),
    )
    op.create_table(
        "processor_state",
        sa.Column("processor_name", sa.Text(), nullable=False),
        sa.Column("key", sa.LargeBinary(), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("processor_name", "key", name="pk_processor_state"),
    )


def downgrade() -> None:
    op.drop_table("processor_state")
    op.drop_table("log_partition_heads")
    op.drop_table("log_records")
