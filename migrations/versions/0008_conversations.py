"""The Responses and Conversations APIs' stored text (conversations, conversation_items,
stored_responses) and each tenant's retention and safety policy (tenant_policies); storage.conversations.

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _tenant_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["tenant_id"], ["tenants.tenant_id"], name=f"fk_{table}_tenant_id_tenants", ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("conversation_id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("metadata_json", sa.Text(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("conversation_id", name="pk_conversations"),
        _tenant_fk("conversations"),
    )
    op.create_index("ix_conversations_tenant_id", "conversations", ["tenant_id"])
    op.create_table(
        "conversation_items",
        sa.Column("item_id", sa.Text(), nullable=False),
        sa.Column("conversation_id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("position", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("item_json", sa.Text(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("item_id", name="pk_conversation_items"),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.conversation_id"],
            name="fk_conversation_items_conversation_id_conversations",
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        "ix_conversation_items_conversation_id_position",
        "conversation_items",
        ["conversation_id", "position"],
    )
    op.create_table(
        "stored_responses",
        sa.Column("response_id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("conversation_id", sa.Text(), nullable=True),
        sa.Column("history_json", sa.Text(), nullable=False),
        sa.Column("input_json", sa.Text(), nullable=False),
        sa.Column("response_json", sa.Text(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("response_id", name="pk_stored_responses"),
        _tenant_fk("stored_responses"),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.conversation_id"],
            name="fk_stored_responses_conversation_id_conversations",
            ondelete="SET NULL",
        ),
    )
    op.create_index("ix_stored_responses_tenant_id", "stored_responses", ["tenant_id"])
    op.create_index("ix_stored_responses_created_at_ms", "stored_responses", ["created_at_ms"])
    op.create_table(
        "tenant_policies",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("retention_days", sa.BigInteger(), nullable=True),
        sa.Column("safety_policy_json", sa.Text(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_tenant_policies"),
        _tenant_fk("tenant_policies"),
    )


def downgrade() -> None:
    op.drop_table("tenant_policies")
    op.drop_index("ix_stored_responses_created_at_ms", table_name="stored_responses")
    op.drop_index("ix_stored_responses_tenant_id", table_name="stored_responses")
    op.drop_table("stored_responses")
    op.drop_index("ix_conversation_items_conversation_id_position", table_name="conversation_items")
    op.drop_table("conversation_items")
    op.drop_index("ix_conversations_tenant_id", table_name="conversations")
    op.drop_table("conversations")
