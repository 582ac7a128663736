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

# admission_reserve_key() of 0016 with the unprojected usage counted: the same function text, two changes.
_DECLARE = """    key_held bigint;
BEGIN"""
_DECLARE_UNPROJECTED = """    key_held bigint;
    unprojected_daily bigint;
    unprojected_monthly bigint;
BEGIN"""
_SPENT = (
    "    SELECT COALESCE(SUM(e.amount) FILTER (WHERE e.occurred_at_ms >= p_day_start_ms), 0) + key_held,\n"
    "           COALESCE(SUM(e.amount), 0) + key_held\n"
    "    INTO daily_spent, monthly_spent"
)
_SPENT_UNPROJECTED = f"""
    -- Usage folded (its hold settled) but not projected yet still counts; once its entry is projected,
    -- the entry counts instead. Past UNPROJECTED_COUNTED_MAX_MS a row no longer counts.
    DELETE FROM admission_key_unprojected AS u USING ledger_entries AS e
    WHERE u.api_key_id = p_api_key_id AND e.entry_id = u.entry_id;
    DELETE FROM admission_key_unprojected AS u
    WHERE u.api_key_id = p_api_key_id AND u.settled_at_ms < p_now_ms - {UNPROJECTED_COUNTED_MAX_MS};
    SELECT COALESCE(SUM(u.amount) FILTER (WHERE u.settled_at_ms >= p_day_start_ms), 0),
           COALESCE(SUM(u.amount) FILTER (WHERE u.settled_at_ms >= p_month_start_ms), 0)
    INTO unprojected_daily, unprojected_monthly
    FROM admission_key_unprojected AS u WHERE u.api_key_id = p_api_key_id;
    SELECT COALESCE(SUM(e.amount) FILTER (WHERE e.occurred_at_ms >= p_day_start_ms), 0) + key_held
               + unprojected_daily,
           COALESCE(SUM(e.amount), 0) + key_held + unprojected_monthly
    INTO daily_spent, monthly_spent"""


def _function_of_0016() -> str:
    path = Path(__file__).with_name("0016_key_budgets.py")
    spec = importlib.util.spec_from_file_location("migration_0016", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RESERVE_KEY_FUNCTION.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def _function_counting_unprojected() -> str:
    function = _function_of_0016()
    assert function.count(_DECLARE) == 1 and function.count(_SPENT) == 1, "0016's function changed"
    return function.replace(_DECLARE, _DECLARE_UNPROJECTED).replace(_SPENT, _SPENT_UNPROJECTED)


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
    op.execute(_function_counting_unprojected())


def downgrade() -> None:
    op.execute(_function_of_0016())
    op.drop_index("ix_admission_key_unprojected_api_key_id", table_name="admission_key_unprojected")
    op.drop_table("admission_key_unprojected")
