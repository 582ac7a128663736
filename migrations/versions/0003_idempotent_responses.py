"""Stored responses of non-streaming inference requests sent with an Idempotency-Key.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "idempotent_responses",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column("request_sha256", sa.LargeBinary(), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),  # NULL while the first request runs
        sa.Column("response_body", sa.LargeBinary(), nullable=True),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("completed_at_ms", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "idempotency_key", name="pk_idempotent_responses"),
        sa.CheckConstraint(
            "octet_length(request_sha256) = 32", name="ck_idempotent_responses_request_sha256_length"
        ),
        sa.CheckConstraint(
            "(status_code IS NULL) = (response_body IS NULL)",
            name="ck_idempotent_responses_response_complete",
        ),
    )
    op.create_index("ix_idempotent_responses_created_at_ms", "idempotent_responses", ["created_at_ms"])


def downgrade() -> None:
    op.drop_index("ix_idempotent_responses_created_at_ms", table_name="idempotent_responses")
    op.drop_table("idempotent_responses")
