"""Budgets per API key count usage folded but not yet projected: admission_key_unprojected holds a
settled hold of a key with a budget (its usage entry's id, amount and when it settled) until the
projector writes that entry; admission_reserve_key() counts it (gateway.admission.budgets).

Revision ID: 0019
Revises: 0018
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

from storage.admission import UNPROJECTED_COUNTED_MAX_MS

revision: str = "0019"
down_revision: str | Sequence[str] | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RESERVE_KEY_FUNCTION = """
CREATE OR REPLACE FUNCTION admission_reserve_key(
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
    unprojected_daily bigint;
    unprojected_monthly bigint;
BEGIN
    -- The key's row lock: reservations of one key queue here, from every gateway (then the tenant's
    -- row lock inside admission_reserve, always in this order). The limits are read under it, fresh.
    SELECT k.daily_credits, k.monthly_credits INTO daily_limit, monthly_limit
    FROM api_keys AS k WHERE k.key_id = p_api_key_id FOR UPDATE;
    -- Fresh snapshots (READ COMMITTED, VOLATILE): every hold committed by earlier holders of the lock.
    SELECT COALESCE(SUM(h.amount), 0) INTO key_held
    FROM admission_holds AS h WHERE h.api_key_id = p_api_key_id AND h.expires_at_ms > p_now_ms;
    -- Usage folded (its hold settled) but not projected yet still counts; once its entry is projected,
    -- the entry counts instead. Past UNPROJECTED_COUNTED_MAX_MS a row no longer counts.
    DELETE FROM admission_key_unprojected AS u USING ledger_entries AS e
    WHERE u.api_key_id = p_api_key_id AND e.entry_id = u.entry_id;
    DELETE FROM admission_key_unprojected AS u
    WHERE u.api_key_id = p_api_key_id AND u.settled_at_ms < p_now_ms - {counted_max_ms};
    SELECT COALESCE(SUM(u.amount) FILTER (WHERE u.settled_at_ms >= p_day_start_ms), 0),
           COALESCE(SUM(u.amount) FILTER (WHERE u.settled_at_ms >= p_month_start_ms), 0)
    INTO unprojected_daily, unprojected_monthly
    FROM admission_key_unprojected AS u WHERE u.api_key_id = p_api_key_id;
    SELECT COALESCE(SUM(e.amount) FILTER (WHERE e.occurred_at_ms >= p_day_start_ms), 0) + key_held
               + unprojected_daily,
           COALESCE(SUM(e.amount), 0) + key_held + unprojected_monthly
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
""".replace("{counted_max_ms}", str(UNPROJECTED_COUNTED_MAX_MS))


def _function_of_0016() -> str:
    path = Path(__file__).with_name("0016_key_budgets.py")
    spec = importlib.util.spec_from_file_location("migration_0016", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RESERVE_KEY_FUNCTION.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def upgrade() -> None:
    op.create_table(
        "admission_key_unprojected",
        sa.Column("entry_id", sa.Text(), nullable=False),
        sa.Column("api_key_id", sa.Text(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("settled_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("entry_id", name="pk_admission_key_unprojected"),
    )
    op.create_index(
        "ix_admission_key_unprojected_api_key_id", "admission_key_unprojected", ["api_key_id"]
    )
    op.execute(RESERVE_KEY_FUNCTION)


def downgrade() -> None:
    op.execute(_function_of_0016())
    op.drop_index("ix_admission_key_unprojected_api_key_id", table_name="admission_key_unprojected")
    op.drop_table("admission_key_unprojected")
