"""The holds of one gateway process: per tenant, what each admitted request holds, and until when.

A hold is `running` from admit() to finish() (amount = the estimated cost, deadline = admit time +
hold_timeout_ms), then `finished` (amount = the actual cost, deadline = finish time + settle_timeout_ms)
until the balance view reports its usage folded, or until release(). A hold past its deadline is
dropped by `expire()`: reservations never leak, whatever the API layer or the ledger does.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

HEAP_SLACK_FACTOR = 2  # a tenant's deadline heap is rebuilt when it has this many entries per hold...
HEAP_SLACK_MIN = 64  # ...plus this many


@dataclass(slots=True)
class Hold:
    request_id: str
    tenant_id: str
    amount: int
    deadline_ms: int
    finished: bool = False
    api_key_id: str | None = None  # set when the request's key has a budget: the hold counts against it


@dataclass(slots=True)
class _TenantHolds:
    holds: dict[str, Hold] = field(default_factory=dict)
    total: int = 0
    deadlines: list[tuple[int, str]] = field(default_factory=list)  # heap; stale entries skipped on pop


class LocalHolds:
    """Not thread-safe: one event loop. Every method is synchronous, so a caller that checks and then
    adds without an await in between is atomic with respect to every other coroutine."""

    def __init__(self) -> None:
        self._tenants: dict[str, _TenantHolds] = {}
        self._tenant_of: dict[str, str] = {}  # request id -> tenant id
        self._key_totals: dict[str, int] = {}  # api key id -> its holds' total (keys with a budget only)

    def total(self, tenant_id: str) -> int:
        tenant = self._tenants.get(tenant_id)
        return tenant.total if tenant is not None else 0

    def key_total(self, api_key_id: str) -> int:
        """What this process holds for requests made with the key (gateway.admission.budgets)."""
        return self._key_totals.get(api_key_id, 0)

    def count(self, tenant_id: str) -> int:
        tenant = self._tenants.get(tenant_id)
        return len(tenant.holds) if tenant is not None else 0

    def open_count(self) -> int:
        return len(self._tenant_of)

    def get(self, request_id: str) -> Hold | None:
        tenant_id = self._tenant_of.get(request_id)
        if tenant_id is None:
            return None
        return self._tenants[tenant_id].holds[request_id]

    def add(self, hold: Hold) -> None:
        assert hold.amount >= 0, f"a hold cannot be negative: {hold}"
        assert hold.request_id not in self._tenant_of, f"request {hold.request_id!r} already holds credit"
        tenant = self._tenants.setdefault(hold.tenant_id, _TenantHolds())
        tenant.holds[hold.request_id] = hold
        tenant.total += hold.amount
        heapq.heappush(tenant.deadlines, (hold.deadline_ms, hold.request_id))
        self._tenant_of[hold.request_id] = hold.tenant_id
        if hold.api_key_id is not None:
            self._key_totals[hold.api_key_id] = self._key_totals.get(hold.api_key_id, 0) + hold.amount

    def finish(self, request_id: str, actual_amount: int, deadline_ms: int) -> Hold | None:
        """The request ended: hold what it actually cost until it is folded. None: no such hold."""
        assert actual_amount >= 0, f"actual cost must be non-negative, got {actual_amount}"
        hold = self.get(request_id)
        if hold is None:
            return None
        tenant = self._tenants[hold.tenant_id]
        tenant.total += actual_amount - hold.amount
        if hold.api_key_id is not None:
            key_total = self._key_totals.get(hold.api_key_id, 0) + actual_amount - hold.amount
            self._key_totals[hold.api_key_id] = key_total
        hold.amount = actual_amount
        hold.finished = True
        hold.deadline_ms = deadline_ms
        heapq.heappush(tenant.deadlines, (deadline_ms, request_id))
        return hold

    def drop(self, request_id: str) -> Hold | None:
        tenant_id = self._tenant_of.pop(request_id, None)
        if tenant_id is None:
            return None
        tenant = self._tenants[tenant_id]
        hold = tenant.holds.pop(request_id)
        tenant.total -= hold.amount
        assert tenant.total >= 0, f"tenant {tenant_id!r} holds a negative total {tenant.total}"
        if hold.api_key_id is not None:
            key_total = self._key_totals.pop(hold.api_key_id, 0) - hold.amount
            assert key_total >= 0, f"key {hold.api_key_id!r} holds a negative total {key_total}"
            if key_total:
                self._key_totals[hold.api_key_id] = key_total
        if not tenant.holds:
            del self._tenants[tenant_id]
        elif len(tenant.deadlines) > HEAP_SLACK_FACTOR * len(tenant.holds) + HEAP_SLACK_MIN:
            tenant.deadlines = [(h.deadline_ms, h.request_id) for h in tenant.holds.values()]
            heapq.heapify(tenant.deadlines)  # drop the entries of holds already gone
        return hold

    def expire(self, tenant_id: str, now_ms: int) -> list[Hold]:
        """Drop the tenant's holds whose deadline has passed; return them."""
        tenant = self._tenants.get(tenant_id)
        expired: list[Hold] = []
        while tenant is not None and tenant.deadlines and tenant.deadlines[0][0] <= now_ms:
            deadline_ms, request_id = heapq.heappop(tenant.deadlines)
            hold = tenant.holds.get(request_id)
            if hold is not None and hold.deadline_ms == deadline_ms:  # else a stale entry (finished later)
                expired.append(hold)
                self.drop(request_id)
                tenant = self._tenants.get(tenant_id)
        return expired

    def expire_all(self, now_ms: int) -> list[Hold]:
        expired: list[Hold] = []
        for tenant_id in list(self._tenants):
            expired.extend(self.expire(tenant_id, now_ms))
        return expired
