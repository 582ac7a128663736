"""Webhook secret rotation with an overlap: webhook_endpoints.previous_secret keeps signing beside the new
secret until previous_secret_expires_at_ms (storage.webhooks.WebhookEndpoint.rotate_secret).

Revision ID: 0020
Revises: 0019
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | Sequence[str] | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("webhook_endpoints", sa.Column("previous_secret", sa.Text(), nullable=True))
    op.add_column(
        "webhook_endpoints", sa.Column("previous_secret_expires_at_ms", sa.BigInteger(), nullable=True)
    )
    op.create_check_constraint(
        op.f("ck_webhook_endpoints_previous_secret_scheme"),
        "webhook_endpoints",
        "previous_secret LIKE 'whsec_%'",
    )
    op.create_check_constraint(
        op.f("ck_webhook_endpoints_previous_secret_expires"),
        "webhook_endpoints",
        "(previous_secret IS NULL) = (previous_secret_expires_at_ms IS NULL)",
    )


def downgrade() -> None:
    op.drop_constraint(
        op.f("ck_webhook_endpoints_previous_secret_expires"), "webhook_endpoints", type_="check"
    )
    op.drop_constraint(
        op.f("ck_webhook_endpoints_previous_secret_scheme"), "webhook_endpoints", type_="check"
    )
    op.drop_column("webhook_endpoints", "previous_secret_expires_at_ms")
    op.drop_column("webhook_endpoints", "previous_secret")
