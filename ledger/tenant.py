"""A tenant's ledger: the account state with an in-memory usage index beside it.

What tests, the calculator and audit replays use; the stream processor pairs `Account` with its own
durable index instead.
"""

from __future__ import annotations

from ledger.account import Account, CreditBlockAt, Statement, Totals
from ledger.entries import Entry
from ledger.events import CreditGranted, GrantVoided, UsageRecorded
from ledger.usage_index import InMemoryUsageIndex


class TenantLedger:
    def __init__(self, tenant_id: str) -> None:
        self.account = Account(tenant_id)
        self.index = InMemoryUsageIndex()

    @property
    def tenant_id(self) -> str:
        return self.account.tenant_id

    def apply(self, event: CreditGranted | GrantVoided | UsageRecorded) -> list[Entry]:
        if type(event) is UsageRecorded and event.tenant_id == self.account.tenant_id:
            return self.account.apply_usage(event, self.index)  # the hot path, one call shorter
        return self.account.apply(event, self.index)

    def advance_to(self, stream_time: int) -> list[Entry]:
        return self.account.advance_to(stream_time)

    def balance_at(self, t: int) -> int:
        return self.account.balance_at(t, self.index)

    def overage_at(self, t: int) -> int:
        return self.account.overage_at(t, self.index)

    def blocks_at(self, t: int) -> list[CreditBlockAt]:
        return self.account.blocks_at(t, self.index)

    def totals_at(self, t: int) -> Totals:
        return self.account.totals_at(t, self.index)

    def statement(self, start: int, end: int) -> Statement:
        return self.account.statement(start, end, self.index)


class Book:
    """Every tenant's ledger, for replaying a mixed event stream (an audit, a test oracle)."""

    def __init__(self) -> None:
        self.tenants: dict[str, TenantLedger] = {}

    def tenant(self, tenant_id: str) -> TenantLedger:
        ledger = self.tenants.get(tenant_id)
        if ledger is None:
            ledger = self.tenants[tenant_id] = TenantLedger(tenant_id)
        return ledger

    def apply(self, event: CreditGranted | GrantVoided | UsageRecorded) -> list[Entry]:
        return self.tenant(event.tenant_id).apply(event)
