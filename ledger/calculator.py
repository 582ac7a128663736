"""The classic GPU-credit calculator, answered by the same fold as everything else.

Calls may arrive in any order; answers are as if every call had been applied in timestamp order
(grants before usage at equal timestamps). A block counts iff timestamp <= t < expiration_timestamp;
usage draws the soonest expiry first; a shortfall is overage, so the balance is never negative.
"""

from __future__ import annotations

from itertools import count

from ledger.events import CreditGranted, UsageRecorded, validated
from ledger.tenant import TenantLedger

CALCULATOR_TENANT = "calculator"


class CreditCalculator:
    def __init__(self) -> None:
        self._ledger = TenantLedger(CALCULATOR_TENANT)
        self._usage_numbers = count(1)

    def create_grant(
        self, *, grant_id: str, amount: int, timestamp: int, expiration_timestamp: int | None
    ) -> None:
        event = CreditGranted(
            event_id=f"grant:{grant_id}",
            tenant_id=CALCULATOR_TENANT,
            grant_id=grant_id,
            amount=amount,
            effective_at=timestamp,
            expires_at=expiration_timestamp,
        )
        self._ledger.apply(validated(event))

    def subtract(self, *, amount: int, timestamp: int) -> None:
        event = UsageRecorded(
            event_id=f"usage:{next(self._usage_numbers)}",
            tenant_id=CALCULATOR_TENANT,
            amount=amount,
            occurred_at=timestamp,
            model="calculator",
        )
        self._ledger.apply(validated(event))

    def get_balance(self, *, timestamp: int) -> int:
        return self._ledger.balance_at(timestamp)

    def get_overage(self, *, timestamp: int) -> int:
        return self._ledger.overage_at(timestamp)
