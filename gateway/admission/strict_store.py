"""Strict mode's reservations in Postgres: the tenant's row in admission_accounts is its one owner.

reserve() is one call of the SQL function admission_reserve() (migration 0004), a transaction of its
own (autocommit), so the lock is held only while the server runs it, never across a Python await:
  1. upsert the tenant's account row with this gateway's view of the balance, kept only when newer
     (applied_offset, then as_of): every gateway brings what its view read, the row keeps the newest.
     The upsert takes the row lock (ON CONFLICT DO UPDATE locks the row), so reservations of one
     tenant queue here, across every gateway.
  2. under the lock, statements with fresh snapshots (READ COMMITTED, a VOLATILE function) that see
     every hold committed by earlier lock holders: drop the tenant's expired holds, sum the rest, and
     insert the new hold only if (balance spendable now - sum) >= cost.
Every statement that adds to a tenant's holds runs under that lock; the others only shrink them
(release, finish at an actual cost below the estimate, settle), so no two gateways can both spend the
last credit.

settle(): when a view reports request R's usage folded into a balance B (B.applied_offset >= R's
offset on ledger.events), one transaction raises the account row to at least B and deletes R's hold.
Both together or neither: the row never counts R twice (in the balance and as a hold) for long, and
never zero times.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.admission.budgets import KeyBudget, KeySpend, Windows
from gateway.ledger_view import PublishedBalance
from ledger.entries import usage_entry_id

NO_BALANCE_OFFSET = -1  # an account row for a tenant no view has a balance for yet

_NEWER = "(excluded.applied_offset, excluded.as_of_ms) > (account.applied_offset, account.as_of_ms)"
_SETTLE = text(f"""
WITH raised AS (
INSERT INTO admission_accounts AS account (tenant_id, balance, applied_offset, as_of_ms, expiring,
    updated_at_ms)
    SELECT tenant_id, balance, applied_offset, as_of_ms, expiring, :now_ms
    FROM unnest(CAST(:tenant_ids AS text[]), CAST(:balances AS bigint[]), CAST(:applied_offsets AS bigint[]),
                CAST(:as_of_ms AS bigint[]), CAST(:expirings AS jsonb[]))
         AS reported (tenant_id, balance, applied_offset, as_of_ms, expiring)
    ORDER BY tenant_id
    ON CONFLICT (tenant_id) DO UPDATE SET
        balance = CASE WHEN {_NEWER} THEN excluded.balance ELSE account.balance END,
        applied_offset = CASE WHEN {_NEWER} THEN excluded.applied_offset ELSE account.applied_offset END,
        as_of_ms = CASE WHEN {_NEWER} THEN excluded.as_of_ms ELSE account.as_of_ms END,
        expiring = CASE WHEN {_NEWER} THEN excluded.expiring ELSE account.expiring END,
        updated_at_ms = CASE WHEN {_NEWER} THEN excluded.updated_at_ms ELSE account.updated_at_ms END
    RETURNING 1
), settled AS (
    DELETE FROM admission_holds WHERE request_id = ANY(:request_ids)
    RETURNING request_id, api_key_id, amount
)
-- A key's settled usage keeps counting against its budget until the projector writes its entry.
INSERT INTO admission_key_unprojected (entry_id, api_key_id, amount, settled_at_ms)
SELECT usage.entry_id, settled.api_key_id, settled.amount, :now_ms
FROM settled
JOIN unnest(CAST(:request_ids AS text[]), CAST(:entry_ids AS text[])) AS usage (request_id, entry_id)
    ON usage.request_id = settled.request_id
WHERE settled.api_key_id IS NOT NULL AND settled.amount > 0
ON CONFLICT (entry_id) DO NOTHING
""")

_RESERVE = text("""
SELECT reserved, spendable, held, holds FROM admission_reserve(
    :tenant_id, :request_id, :amount, :balance, :applied_offset, :as_of_ms, CAST(:expiring AS JSONB),
    :now_ms, :expires_at_ms, :holds_max
)
""")

_RESERVE_KEY = text("""
SELECT reserved, spendable, held, holds,
       budget_refused, daily_limit, monthly_limit, daily_spent, monthly_spent
FROM admission_reserve_key(
    :api_key_id, :day_start_ms, :month_start_ms,
    :tenant_id, :request_id, :amount, :balance, :applied_offset, :as_of_ms, CAST(:expiring AS JSONB),
    :now_ms, :expires_at_ms, :holds_max
)
""")

_FINISH = text("""
UPDATE admission_holds SET amount = :amount, finished_at_ms = :now_ms, expires_at_ms = :expires_at_ms
WHERE request_id = :request_id
""")

_DELETE_HOLDS = text("DELETE FROM admission_holds WHERE request_id = ANY(:request_ids)")


@dataclass(frozen=True, slots=True)
class ReserveResult:
    reserved: bool
    spendable: int  # the owner row's balance, without blocks expired by now
    held: int  # the tenant's other open holds, across every gateway
    holds: int
    # A key with a budget (admission_reserve_key): the window refused (None: not refused), the key's
    # limits as its row has them now, and its spend (usage entries + open holds) before this request.
    budget_refused: str | None = None
    budget: KeyBudget | None = None
    spend: KeySpend | None = None

    @property
    def available(self) -> int:
        return self.spendable - self.held


@dataclass(frozen=True, slots=True)
class Settlement:
    request_id: str
    balance: PublishedBalance  # includes the request's usage


def _account_parameters(tenant_id: str, balance: PublishedBalance | None, now_ms: int) -> dict:
    if balance is None:
        return {
            "tenant_id": tenant_id,
            "balance": 0,
            "applied_offset": NO_BALANCE_OFFSET,
            "as_of_ms": -1,
            "expiring": "[]",
            "now_ms": now_ms,
        }
    expiring = json.dumps([[expires_at_ms, remaining] for expires_at_ms, remaining in balance.expiring])
    return {
        "tenant_id": tenant_id,
        "balance": balance.balance,
        "applied_offset": balance.applied_offset,
        "as_of_ms": balance.as_of_ms,
        "expiring": expiring,
        "now_ms": now_ms,
    }


def _owner_balance(tenant_id: str, account) -> PublishedBalance:
    """An admission_accounts row as a PublishedBalance (overage is not kept there)."""
    expiring = tuple((int(expires_at_ms), int(remaining)) for expires_at_ms, remaining in account.expiring)
    return PublishedBalance(tenant_id, account.balance, 0, account.as_of_ms, account.applied_offset, expiring)


class StrictStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def reserve(
        self,
        *,
        tenant_id: str,
        request_id: str,
        amount: int,
        view_balance: PublishedBalance | None,
        now_ms: int,
        expires_at_ms: int,
        holds_max: int,
        api_key_id: str | None = None,
    ) -> ReserveResult:
        """With `api_key_id` (a key with a budget), admission_reserve_key: the key's row lock, its spend
        against its limits, then the tenant's reservation, in one statement (migration 0016)."""
        parameters = _account_parameters(tenant_id, view_balance, now_ms) | {
            "request_id": request_id,
            "amount": amount,
            "expires_at_ms": expires_at_ms,
            "holds_max": holds_max,
        }
        if api_key_id is None:
            # One statement in its own transaction: the row lock is held only while the server runs it.
            [row] = await self._execute_alone(_RESERVE, parameters)
            return ReserveResult(
                reserved=row.reserved, spendable=row.spendable, held=row.held, holds=row.holds
            )
        windows = Windows.at(now_ms)
        parameters |= {
            "api_key_id": api_key_id,
            "day_start_ms": windows.day_start_ms,
            "month_start_ms": windows.month_start_ms,
        }
        [row] = await self._execute_alone(_RESERVE_KEY, parameters)
        return ReserveResult(
            reserved=row.reserved,
            spendable=row.spendable,
            held=row.held,
            holds=row.holds,
            budget_refused=row.budget_refused,
            budget=KeyBudget(api_key_id, row.daily_limit, row.monthly_limit),
            spend=KeySpend(int(row.daily_spent or 0), int(row.monthly_spent or 0)),
        )

    async def finish(self, request_id: str, amount: int, now_ms: int, expires_at_ms: int) -> None:
        await self._execute_alone(
            _FINISH,
            {
                "request_id": request_id,
                "amount": amount,
                "now_ms": now_ms,
                "expires_at_ms": expires_at_ms,
            },
        )

    async def release(self, request_ids: Sequence[str]) -> None:
        await self._execute_alone(_DELETE_HOLDS, {"request_ids": list(request_ids)})

    async def settle(self, settlements: Sequence[Settlement], now_ms: int) -> None:
        """Raise each tenant's row to the newest balance reported, then delete the holds it includes."""
        newest: dict[str, PublishedBalance] = {}
        for settlement in settlements:
            balance = settlement.balance
            current = newest.get(balance.tenant_id)
            if current is None or (balance.applied_offset, balance.as_of_ms) > (
                current.applied_offset,
                current.as_of_ms,
            ):
                newest[balance.tenant_id] = balance
        rows = [_account_parameters(tenant_id, balance, now_ms) for tenant_id, balance in newest.items()]
        # One statement (the raise and the delete atomic together), its own transaction: the rows'
        # locks are held only while the server runs it, taken in tenant order.
        await self._execute_alone(
            _SETTLE,
            {
                "now_ms": now_ms,
                "tenant_ids": [row["tenant_id"] for row in rows],
                "balances": [row["balance"] for row in rows],
                "applied_offsets": [row["applied_offset"] for row in rows],
                "as_of_ms": [row["as_of_ms"] for row in rows],
                "expirings": [row["expiring"] for row in rows],
                "request_ids": [settlement.request_id for settlement in settlements],
                "entry_ids": [
                    usage_entry_id(settlement.balance.tenant_id, settlement.request_id)
                    for settlement in settlements
                ],
            },
        )

    async def snapshot(self, tenant_id: str, now_ms: int) -> tuple[int, int]:
        """(the owner row's balance spendable now, the tenant's open holds), read without locking."""
        async with self.engine.connect() as connection:
            account = (
                await connection.execute(
                    text(
                        "SELECT balance, applied_offset, as_of_ms, expiring FROM admission_accounts WHERE tenant_id = :t"  # noqa: E501
                    ),
                    {"t": tenant_id},
                )
            ).one_or_none()
            held = (
                await connection.execute(
                    text(
                        "SELECT COALESCE(SUM(amount), 0) FROM admission_holds WHERE tenant_id = :t AND expires_at_ms > :now"  # noqa: E501
                    ),
                    {"t": tenant_id, "now": now_ms},
                )
            ).scalar_one()
        spendable = _owner_balance(tenant_id, account).spendable_at(now_ms) if account is not None else 0
        return spendable, held

    async def _execute_alone(self, statement, parameters: dict) -> list:
        """Run one statement as its own transaction (autocommit: one round trip, no BEGIN/COMMIT)."""
        async with self.engine.connect() as connection:
            autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
            result = await autocommit.execute(statement, parameters)
            return result.all() if result.returns_rows else []
