"""Strict admission: the tenant's owner row (admission_accounts), the open holds (admission_holds), and
admission_reserve(), the reservation as one server-side call (see gateway.admission.strict_store).

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


NEWER = "(excluded.applied_offset, excluded.as_of_ms) > (account.applied_offset, account.as_of_ms)"

RESERVE_FUNCTION = f"""
CREATE FUNCTION admission_reserve(
    p_tenant_id text, p_request_id text, p_amount bigint,
    p_balance bigint, p_applied_offset bigint, p_as_of_ms bigint, p_expiring jsonb,
    p_now_ms bigint, p_expires_at_ms bigint, p_holds_max bigint,
    OUT reserved boolean, OUT spendable bigint, OUT held bigint, OUT holds bigint
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    owner admission_accounts%ROWTYPE;
BEGIN
    -- The owner row, raised to the caller's view of the balance when that is newer. The upsert locks
    -- the row until the transaction ends: reservations of one tenant queue here, from every gateway.
INSERT INTO admission_accounts AS account (tenant_id, balance, applied_offset, as_of_ms, expiring,
    updated_at_ms)
    VALUES (p_tenant_id, p_balance, p_applied_offset, p_as_of_ms, p_expiring, p_now_ms)
    ON CONFLICT (tenant_id) DO UPDATE SET
        balance = CASE WHEN {NEWER} THEN excluded.balance ELSE account.balance END,
        applied_offset = CASE WHEN {NEWER} THEN excluded.applied_offset ELSE account.applied_offset END,
        as_of_ms = CASE WHEN {NEWER} THEN excluded.as_of_ms ELSE account.as_of_ms END,
        expiring = CASE WHEN {NEWER} THEN excluded.expiring ELSE account.expiring END,
        updated_at_ms = CASE WHEN {NEWER} THEN excluded.updated_at_ms ELSE account.updated_at_ms END
    RETURNING account.* INTO owner;
    -- Each statement below takes a new snapshot (READ COMMITTED, a VOLATILE function), taken after the
    -- lock was granted: it sees every hold committed by the earlier holders of the lock.
    DELETE FROM admission_holds AS h WHERE h.tenant_id = p_tenant_id AND h.expires_at_ms <= p_now_ms;
    SELECT COALESCE(SUM(h.amount), 0), count(*) INTO held, holds
    FROM admission_holds AS h WHERE h.tenant_id = p_tenant_id;
    spendable := owner.balance - COALESCE((
        SELECT SUM((block ->> 1)::bigint) FROM jsonb_array_elements(owner.expiring) AS block
        WHERE (block ->> 0)::bigint <= p_now_ms
    ), 0);
    reserved := (p_amount = 0 OR spendable - held >= p_amount) AND holds < p_holds_max;
    IF reserved THEN
        INSERT INTO admission_holds (request_id, tenant_id, amount, created_at_ms, expires_at_ms)
        VALUES (p_request_id, p_tenant_id, p_amount, p_now_ms, p_expires_at_ms);
    END IF;
END
$$
"""


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
    op.execute(RESERVE_FUNCTION)


def downgrade() -> None:
    op.execute("DROP FUNCTION admission_reserve")
    op.drop_index(op.f("ix_admission_holds_tenant_id"), table_name="admission_holds")
    op.drop_table("admission_holds")
    op.drop_table("admission_accounts")
