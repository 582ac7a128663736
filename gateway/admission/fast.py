"""Fast mode: reserve against this process's balance view, in memory. The default.

    available(tenant) = view balance spendable now - this process's holds of the tenant
    admit iff estimated_cost <= available (or the request is free)

The check and the hold happen with no await in between, so on the gateway's event loop they are one
atomic step (stronger than a per-tenant asyncio.Lock, and cheaper): within one process the holds
never exceed the view's balance, whatever the concurrency.

The overspend bound. Each gateway process sees only its own holds, so N processes racing for one tenant
could each spend the whole balance before any sees the others' usage folded. Shares prevent that: with
`gateway_processes` = N, a process admits iff its holds plus the cost fit in its share (the spendable
balance / N), or, when it holds nothing for the tenant, iff the cost fits in the whole spendable
balance (so a request larger than a share still runs). Each process then holds at most its share or
one request, and all of them together at most the balance plus N x one request's maximum cost: the
overspend bound. `python -m bench.overspend` measures it (2 gateways, 200 concurrent requests racing
for a balance worth 10 requests). Use strict mode when that matters more than latency.
"""

from __future__ import annotations

from gateway.admission.base import AdmissionRequest, Rejection, Reservation
from gateway.admission.core import AdmissionCore, check_request, credit_exhausted, limited_budget
from gateway.admission.holds import Hold
from gateway.admission.view_guard import require_fresh_view
from gateway.ledger_view import PublishedBalance
from ledger.entries import usage_entry_id


class FastAdmission(AdmissionCore):
    mode = "fast"

    async def admit(self, request: AdmissionRequest) -> Reservation:
        check_request(request)
        try:
            await require_fresh_view(self.view, self.settings, self.clock_ms())
        except Rejection as rejection:
            raise self._refused(rejection) from None
        budget = limited_budget(request)
        if budget is not None:  # the key's usage entries, read (or cached) before the atomic step
            try:
                key_entries = await self.key_spend.spent(budget, self.clock_ms())
            except Rejection as rejection:
                raise self._refused(rejection) from None
        # From here to the return there is no await: check and hold are one step on the event loop.
        now_ms = self.clock_ms()
        tenant_id = request.tenant_id
        self._forget(self.holds.expire(tenant_id, now_ms), "timed_out")
        available = self.available(tenant_id, now_ms, request.model)
        cost = request.estimated_cost
        if cost > 0 and not self._fits(tenant_id, cost, now_ms, request.model):
            headers = self.rate_limiter.peek_headers(tenant_id, request.tier, now_ms)
            raise self._refused(credit_exhausted(request, available, headers))
        credits = {} if budget is None else self._check_key_budget(request, budget, key_entries, now_ms)
        headers = self._take_hold_slot_and_rate(request, now_ms)
        return self._held(request, now_ms, {**headers, **credits})

    async def finish(self, reservation: Reservation, actual_cost: int) -> None:
        hold = self._finish_locally(reservation, actual_cost, self.clock_ms())
        if hold is not None and actual_cost == 0:
            self._release_locally(reservation)  # nothing to wait for: the fold takes nothing

    async def release(self, reservation: Reservation) -> None:
        self._release_locally(reservation)

    def _settled(self, hold: Hold, balance: PublishedBalance) -> None:
        if hold.api_key_id is not None:  # its usage counts against the key's budget until projected
            entry_id = usage_entry_id(hold.tenant_id, hold.request_id)
            self.key_spend.settled(hold.api_key_id, entry_id, hold.amount, self.clock_ms())

    async def held(self, tenant_id: str) -> int:
        """The tenant's open holds in this process (the live balance subtracts them)."""
        return self.holds.total(tenant_id)

    def available(self, tenant_id: str, now_ms: int, model: str | None = None) -> int:
        """The view's balance spendable now (by a request of `model`: without the credit scoped to other
        models) minus this process's holds (may be negative)."""
        return self._spendable(tenant_id, now_ms, model) - self.holds.total(tenant_id)

    def _fits(self, tenant_id: str, cost: int, now_ms: int, model: str | None = None) -> bool:
        """Within this process's share, or a lone request within the whole spendable balance."""
        spendable = self._spendable(tenant_id, now_ms, model)
        held = self.holds.total(tenant_id)
        if held == 0:
            return cost <= spendable
        return held + cost <= spendable // self.settings.gateway_processes

    def _spendable(self, tenant_id: str, now_ms: int, model: str | None) -> int:
        balance = self.view.balance(tenant_id)
        if balance is None:
            return 0
        return balance.spendable_at(now_ms) if model is None else balance.spendable_for(model, now_ms)
