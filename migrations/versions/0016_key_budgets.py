"""Budgets per API key: api_keys carry daily_credits and monthly_credits (NULL: no limit), usage entries
carry the key's id (ledger_entries.api_key_id, indexed by key and time where set), strict admission's
holds carry it too (admission_holds.api_key_id), and admission_reserve_key(), strict mode's reservation
for a key with a budget: the key's row lock, its spend (usage entries of the windows plus its open holds)
checked against its limits, then admission_reserve() in the same transaction (gateway.admission.strict_store).

Revision ID: 0016
Revises: 0015
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RESERVE_KEY_FUNCTION = """
CREATE FUNCTION admission_reserve_key(
    p_api_key_id text, p_day_start_ms bigint, p_month_start_ms bigint,
    p_tenant_id text, p_request_id text, p_amount bigint,
    p_balance bigint, p_applied_offset bigint, p_as_of_ms bigint, p_expiring jsonb,
    p_now_ms bigint, p_expires_at_ms bigint, p_holds_max bigint,
    OUT reserved boolean, OUT spendable bigint, OUT held bigint, OUT holds bigint,
    OUT budget_refused text, OUT daily_limit bigint, OUT monthly_limit bigint,
    OUT daily_spent bigint, OUT monthly_spent bigint
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    key_held bigint;
BEGIN
    -- The key's row lock: reservations of one key queue here, from every gateway (then the tenant's
    -- row lock inside admission_reserve, always in this order). The limits are read under it, fresh.
    SELECT k.daily_credits, k.monthly_credits INTO daily_limit, monthly_limit
    FROM api_keys AS k WHERE k.key_id = p_api_key_id FOR UPDATE;
    -- Fresh snapshots (READ COMMITTED, VOLATILE): every hold committed by earlier holders of the lock.
    SELECT COALESCE(SUM(h.amount), 0) INTO key_held
    FROM admission_holds AS h WHERE h.api_key_id = p_api_key_id AND h.expires_at_ms > p_now_ms;
    SELECT COALESCE(SUM(e.amount) FILTER (WHERE e.occurred_at_ms >= p_day_start_ms), 0) + key_held,
           COALESCE(SUM(e.amount), 0) + key_held
    INTO daily_spent, monthly_spent
    FROM ledger_entries AS e
    WHERE e.api_key_id = p_api_key_id AND e.entry_type = 'usage_allocated'
      AND e.occurred_at_ms >= p_month_start_ms;  -- a month starts at or before its days
    IF daily_limit IS NOT NULL AND p_amount > 0 AND daily_spent + p_amount > daily_limit THEN
        budget_refused := 'daily_credits';
    ELSIF monthly_limit IS NOT NULL AND p_amount > 0 AND monthly_spent + p_amount > monthly_limit THEN
        budget_refused := 'monthly_credits';
    END IF;
    IF budget_refused IS NOT NULL THEN
        reserved := false;
        spendable := 0;
        held := 0;
        holds := 0;
        RETURN;
    END IF;
    SELECT r.reserved, r.spendable, r.held, r.holds INTO reserved, spendable, held, holds
    FROM admission_reserve(p_tenant_id, p_request_id, p_amount, p_balance, p_applied_offset, p_as_of_ms,
                           p_expiring, p_now_ms, p_expires_at_ms, p_holds_max) AS r;
    IF reserved THEN
        UPDATE admission_holds SET api_key_id = p_api_key_id WHERE request_id = p_request_id;
    END IF;
END
$$
"""


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("daily_credits", sa.BigInteger(), nullable=True))
    op.add_column("api_keys", sa.Column("monthly_credits", sa.BigInteger(), nullable=True))
    op.create_check_constraint(
        op.f("ck_api_keys_daily_credits_non_negative"),
        "api_keys",
        "daily_credits IS NULL OR daily_credits >= 0",
    )
    op.create_check_constraint(
        op.f("ck_api_keys_monthly_credits_non_negative"),
        "api_keys",
        "monthly_credits IS NULL OR monthly_credits >= 0",
    )
    op.add_column("ledger_entries", sa.Column("api_key_id", sa.Text(), nullable=True))
    op.create_index(
        "ix_ledger_entries_api_key_id_occurred_at_ms",
        "ledger_entries",
        ["api_key_id", "occurred_at_ms"],
        unique=False,
        postgresql_where=sa.text("api_key_id IS NOT NULL"),
    )
    op.add_column("admission_holds", sa.Column("api_key_id", sa.Text(), nullable=True))
    op.create_index(op.f("ix_admission_holds_api_key_id"), "admission_holds", ["api_key_id"], unique=False)
    op.execute(RESERVE_KEY_FUNCTION)


def downgrade() -> None:
    op.execute("DROP FUNCTION admission_reserve_key")
    op.drop_index(op.f("ix_admission_holds_api_key_id"), table_name="admission_holds")
    op.drop_column("admission_holds", "api_key_id")
    op.drop_index("ix_ledger_entries_api_key_id_occurred_at_ms", table_name="ledger_entries")
    op.drop_column("ledger_entries", "api_key_id")
    op.drop_constraint(op.f("ck_api_keys_monthly_credits_non_negative"), "api_keys", type_="check")
    op.drop_constraint(op.f("ck_api_keys_daily_credits_non_negative"), "api_keys", type_="check")
    op.drop_column("api_keys", "monthly_credits")
    op.drop_column("api_keys", "daily_credits")
