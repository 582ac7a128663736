"""Strict mode: every reservation goes through the tenant's owner row in Postgres. Never overspends.

How it differs from fast mode (gateway.admission.fast): fast reserves against this process's view and
holds only, so N gateways racing for a tenant's last credits can each spend them. Strict reserves in
one transaction that locks the tenant's row in `admission_accounts` (gateway.admission.strict_store):
the holds of every gateway are summed under that lock, so the sum of holds never exceeds the newest
balance any gateway's view has seen. Measured by `python -m bench.overspend`: 0 overspent.

What it costs: one server-side call per admission (admission_reserve, its own transaction), serialised
per tenant: 230-800 admissions/s per tenant with release on the 2-core dev machine, against 25k-58k/s
for fast mode. A finished request's hold leaves Postgres when this process's view reports its usage
folded (batched, off the request path). Rate limits stay per process, like fast mode.

Expiry: holds carry `expires_at_ms` computed by the gateway that wrote them, so gateways should run
NTP-synchronised clocks. A gateway that dies leaves its holds to expire (hold_timeout_ms while
running): conservative. A finished hold is dropped settle_timeout_ms after finish even if its usage
was never folded (so nothing leaks when a usage event is lost or dead-lettered); the zero-overspend
promise therefore assumes the ledger processor folds usage within settle_timeout_ms (5 min default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.admission.base import AdmissionRequest, Overloaded, Rejection, Reservation
from gateway.admission.budgets import budget_exceeded, budget_headers, budget_unavailable
from gateway.admission.core import (
    AdmissionCore,
    budget_key_id,
    check_request,
    credit_exhausted,
    limited_budget,
    rate_tokens,
)
from gateway.admission.holds import Hold
from gateway.admission.metrics import REASON_STORE_UNAVAILABLE, AdmissionMetrics
from gateway.admission.settings import AdmissionSettings
from gateway.admission.strict_store import Settlement, StrictStore
from gateway.admission.view_guard import require_fresh_view, too_many_holds
from gateway.ledger_view import LedgerView, PublishedBalance, wall_clock_ms

logger = logging.getLogger(__name__)

STOP_FLUSH_TIMEOUT_MS = 5_000


class ReservationStoreUnavailable(Overloaded):
    reason = REASON_STORE_UNAVAILABLE


class StrictAdmission(AdmissionCore):
    mode = "strict"

    def __init__(
        self,
        view: LedgerView,
        settings: AdmissionSettings,
        engine: AsyncEngine,
        *,
        metrics: AdmissionMetrics | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        super().__init__(view, settings, metrics=metrics, clock_ms=clock_ms, engine=engine)
        self.store = StrictStore(engine)
        self._settlements: asyncio.Queue[Settlement] = asyncio.Queue(maxsize=settings.strict_settle_queue_max)
        self._settler: asyncio.Task | None = None
        self._cleanups: set[asyncio.Task] = set()

    async def start(self) -> None:
        await super().start()
        self._settler = asyncio.create_task(self._settle_forever())

    async def stop(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain(), STOP_FLUSH_TIMEOUT_MS / 1000)
        if self._settler is not None:
            self._settler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._settler
            self._settler = None
        if self._cleanups:
            await asyncio.wait(self._cleanups, timeout=STOP_FLUSH_TIMEOUT_MS / 1000)
        await super().stop()

    async def admit(self, request: AdmissionRequest) -> Reservation:
        check_request(request)
        now_ms = self.clock_ms()
        try:
            await require_fresh_view(self.view, self.settings, now_ms)
        except Rejection as rejection:
            raise self._refused(rejection) from None
        now_ms = self.clock_ms()
        tenant_id = request.tenant_id
        self._forget(self.holds.expire(tenant_id, now_ms), "timed_out")
        usable = self._usable_by_model(request, now_ms)
        if usable is not None and request.estimated_cost > usable:
            headers = self.rate_limiter.peek_headers(request.tenant_id, request.tier, now_ms)
            raise self._refused(credit_exhausted(request, usable, headers))
        headers = self._take_hold_slot_and_rate(request, now_ms)
        try:
            async with asyncio.timeout(self.settings.strict_transaction_timeout_ms / 1000):
                result = await self.store.reserve(
                    tenant_id=tenant_id,
                    request_id=request.request_id,
                    amount=request.estimated_cost,
                    view_balance=self.view.balance(tenant_id),
                    now_ms=now_ms,
                    expires_at_ms=now_ms + self.settings.hold_timeout_ms,
                    holds_max=self.settings.tenant_holds_max,
                    api_key_id=budget_key_id(request),
                )
        except (TimeoutError, SQLAlchemyError, asyncio.CancelledError) as error:
            # The transaction may have committed just before: delete the hold it may have written.
            self._cleanup(request.request_id)
            self.rate_limiter.give_back(tenant_id, rate_tokens(request), self.clock_ms())
            if isinstance(error, asyncio.CancelledError):
                raise
            logger.warning("strict reservation of %s failed: %r", request.request_id, error)
            budget = limited_budget(request)
            if budget is not None:  # fail closed, saying which state was missing
                raise self._refused(budget_unavailable(
                    budget, "the reservation store (Postgres) did not answer",
                    self.settings.view_unavailable_retry_after_s,
                )) from None
            raise self._refused(ReservationStoreUnavailable(
                "The credit reservation store did not answer in time; try again shortly.",
                headers={"retry-after": str(self.settings.view_unavailable_retry_after_s)},
            )) from None
        if result.budget_refused is not None:
            budget, spend = result.budget, result.spend
            assert budget is not None and spend is not None, f"a budget refusal without its state: {result}"
            self.rate_limiter.give_back(tenant_id, rate_tokens(request), self.clock_ms())
            window = result.budget_refused
            raise self._refused(budget_exceeded(budget, window, spend, request.estimated_cost, now_ms))
        if not result.reserved:
            headers = self.rate_limiter.give_back(tenant_id, rate_tokens(request), self.clock_ms())
            if result.holds >= self.settings.tenant_holds_max:
                raise self._refused(too_many_holds(tenant_id, self.settings))
            raise self._refused(credit_exhausted(request, result.available, headers))
        if usable is not None and request.estimated_cost + result.held > usable:
            # Credit scoped to models: the tenant's other holds (of any model) count against what this one's
            # model may use, so concurrent requests never spend credit scoped to other models (conservative,
            # as fast mode: holds are the tenant's, not per model). The hold just written is deleted.
            await self._release_row(request.request_id)
            headers = self.rate_limiter.give_back(tenant_id, rate_tokens(request), self.clock_ms())
            raise self._refused(credit_exhausted(request, usable - result.held, headers))
        if result.budget is not None and result.spend is not None and result.budget.limited:
            credits = budget_headers(result.budget, result.spend, request.estimated_cost, now_ms)
            headers = {**headers, **credits}
        return self._held(request, now_ms, headers)

    def _usable_by_model(self, request: AdmissionRequest, now_ms: int) -> int | None:
        """For a tenant with credit scoped to models (ledger.scoped): the view's credit the request's model
        may use (the reservation counts the tenant's whole balance); None for any other tenant or a free
        request."""
        balance = self.view.balance(request.tenant_id)
        if balance is None or not balance.scoped or request.estimated_cost == 0:
            return None
        return balance.spendable_for(request.model, now_ms)

    async def finish(self, reservation: Reservation, actual_cost: int) -> None:
        now_ms = self.clock_ms()
        hold = self._finish_locally(reservation, actual_cost, now_ms)
        if hold is None:
            return  # already folded (its row is being deleted) or timed out (its row expired)
        if actual_cost == 0:
            await self.release(reservation)
            return
        try:
            async with asyncio.timeout(self.settings.strict_transaction_timeout_ms / 1000):
                await self.store.finish(reservation.request_id, actual_cost, now_ms, hold.deadline_ms)
        except (TimeoutError, SQLAlchemyError) as error:
            # The row keeps the estimate (>= the actual cost) until its hold timeout: conservative.
            logger.warning("could not record the actual cost of %s: %r", reservation.request_id, error)

    async def release(self, reservation: Reservation) -> None:
        self._release_locally(reservation)
        try:
            async with asyncio.timeout(self.settings.strict_transaction_timeout_ms / 1000):
                await self.store.release([reservation.request_id])
        except (TimeoutError, SQLAlchemyError) as error:
            logger.warning("could not release %s, it will expire: %r", reservation.request_id, error)

    async def held(self, tenant_id: str) -> int:
        """The tenant's open holds of every gateway, from Postgres (the live balance subtracts them)."""
        _, held = await self.store.snapshot(tenant_id, self.clock_ms())
        return held

    async def available(self, tenant_id: str) -> int:
        """The owner row's balance spendable now minus every gateway's open holds (introspection, tests)."""
        spendable, held = await self.store.snapshot(tenant_id, self.clock_ms())
        return spendable - held

    # ---------------------------------------------------------------------------------- settling

    def _settled(self, hold: Hold, balance: PublishedBalance) -> None:
        try:
            self._settlements.put_nowait(Settlement(hold.request_id, balance))
        except asyncio.QueueFull:
            logger.warning("settle queue full: hold %s stays in Postgres until it expires", hold.request_id)

    async def _settle_forever(self) -> None:
        while True:
            batch = [await self._settlements.get()]
            while len(batch) < self.settings.strict_settle_batch_max and not self._settlements.empty():
                batch.append(self._settlements.get_nowait())
            await self._settle(batch)

    async def _drain(self) -> None:
        while not self._settlements.empty():
            batch = []
            while len(batch) < self.settings.strict_settle_batch_max and not self._settlements.empty():
                batch.append(self._settlements.get_nowait())
            await self._settle(batch)

    async def _settle(self, batch: list[Settlement]) -> None:
        try:
            async with asyncio.timeout(self.settings.strict_transaction_timeout_ms / 1000):
                await self.store.settle(batch, self.clock_ms())
        except (TimeoutError, SQLAlchemyError) as error:
            # Not settled: the holds stay counted until they expire (conservative).
            logger.warning("settling %d holds failed, they will expire: %r", len(batch), error)

    def _cleanup(self, request_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._release_row(request_id))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _release_row(self, request_id: str) -> None:
        try:
            async with asyncio.timeout(self.settings.strict_transaction_timeout_ms / 1000):
                await self.store.release([request_id])
        except (TimeoutError, SQLAlchemyError) as error:
            logger.warning("could not delete the hold of %s, it will expire: %r", request_id, error)
