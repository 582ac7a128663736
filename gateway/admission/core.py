"""What both admission modes share: the rate limiter, the view guard, this process's holds and their
sweeper, the view's "folded" reports, and the metrics. The modes differ only in where credit is reserved
(gateway.admission.fast, gateway.admission.strict).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.admission.base import AdmissionRequest, CreditExhausted, Rejection, Reservation
from gateway.admission.budgets import (
    KeyBudget,
    KeySpend,
    KeySpendReader,
    budget_exceeded,
    budget_headers,
    exceeded_window,
)
from gateway.admission.holds import Hold, LocalHolds
from gateway.admission.metrics import REASON_CREDIT, AdmissionMetrics
from gateway.admission.rate_limit import RateLimiter
from gateway.admission.settings import AdmissionSettings
from gateway.admission.view_guard import too_many_holds
from gateway.ledger_view import LedgerView, PublishedBalance, wall_clock_ms

logger = logging.getLogger(__name__)


class CreditBalanceExhausted(CreditExhausted):
    reason = REASON_CREDIT


def limited_budget(request: AdmissionRequest) -> KeyBudget | None:
    """The request's key budget when it limits anything; None for a key without one."""
    budget = request.budget
    return budget if budget is not None and budget.limited else None


def budget_key_id(request: AdmissionRequest) -> str | None:
    budget = limited_budget(request)
    return budget.key_id if budget is not None else None


def rate_tokens(request: AdmissionRequest) -> int:
    """What a request counts against the tokens-per-minute limit: its prompt and the most it may produce."""
    return request.prompt_tokens + request.max_tokens


def check_request(request: AdmissionRequest) -> None:
    """The API layer computed these; a negative one is its bug, not the client's."""
    assert request.estimated_cost >= 0, f"estimated_cost must be non-negative: {request}"
    assert request.prompt_tokens >= 0, f"prompt_tokens must be non-negative: {request}"
    assert request.max_tokens >= 0, f"max_tokens must be non-negative: {request}"


def credit_exhausted(
    request: AdmissionRequest, available: int, headers: dict[str, str]
) -> CreditBalanceExhausted:
    return CreditBalanceExhausted(
        f"You exceeded your current quota: this request may cost up to {request.estimated_cost} credits "
        f"and {max(available, 0)} are available. Add credit to your organization to continue.",
        headers=headers,
    )


class AdmissionCore:
    mode = "abstract"

    def __init__(
        self,
        view: LedgerView,
        settings: AdmissionSettings,
        *,
        metrics: AdmissionMetrics | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
        engine: AsyncEngine | None = None,
    ) -> None:
        self.view = view
        self.settings = settings
        self.metrics = metrics or view.metrics
        self.clock_ms = clock_ms
        self.rate_limiter = RateLimiter(settings)
        self.holds = LocalHolds()
        # Keys' usage in their budget windows (fast mode; strict mode reads it in its reservation).
        self.key_spend = KeySpendReader(
            engine,
            settings.budget_spend_cache_ttl_ms,
            settings.view_staleness_max_ms,
            settings.view_unavailable_retry_after_s,
        )
        self._sweeper: asyncio.Task | None = None
        view.add_listener(self._folded)

    async def start(self) -> None:
        assert self._sweeper is None, "already started"
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    def sweep(self, now_ms: int) -> int:
        """Drop every hold past its deadline and forget idle rate buckets; the number of holds dropped."""
        expired = self.holds.expire_all(now_ms)
        self._forget(expired, "timed_out")
        self.rate_limiter.sweep(now_ms)
        return len(expired)

    # -------------------------------------------------------------------------- for the modes

    def _take_hold_slot_and_rate(self, request: AdmissionRequest, now_ms: int) -> dict[str, str]:
        """The per-process limits every mode applies: open holds per tenant, then the tier's requests and
        tokens per minute. Returns the x-ratelimit-* headers; raises the (counted) rejection."""
        if self.holds.count(request.tenant_id) >= self.settings.tenant_holds_max:
            raise self._refused(too_many_holds(request.tenant_id, self.settings))
        try:
            return self.rate_limiter.acquire(request.tenant_id, request.tier, rate_tokens(request), now_ms)
        except Rejection as rejection:
            raise self._refused(rejection) from None

    def _check_key_budget(
        self, request: AdmissionRequest, budget: KeyBudget, entries: KeySpend, now_ms: int
    ) -> dict[str, str]:
        """The key's usage entries plus this process's holds of the key, against its limits: synchronous,
        so with the hold taken after it (no await between) one step on the event loop. Returns the
        x-ratelimit-*-credits headers; raises the (counted) 429 naming the budget."""
        spend = entries.plus(self.holds.key_total(budget.key_id))
        window = exceeded_window(budget, spend, request.estimated_cost)
        if window is not None:
            raise self._refused(budget_exceeded(budget, window, spend, request.estimated_cost, now_ms))
        return budget_headers(budget, spend, request.estimated_cost, now_ms)

    def _refused(self, rejection: Rejection) -> Rejection:
        self.metrics.rejections.labels(reason=getattr(rejection, "reason", rejection.code)).inc()
        return rejection

    def _held(self, request: AdmissionRequest, now_ms: int, headers: dict[str, str]) -> Reservation:
        """Record an admitted request's hold in this process and watch for its usage to be folded."""
        self.holds.add(
            Hold(
                request.request_id,
                request.tenant_id,
                request.estimated_cost,
                now_ms + self.settings.hold_timeout_ms,
                api_key_id=budget_key_id(request),
            )
        )
        self.view.watch(request.tenant_id, request.request_id)
        self.metrics.reservations_open.labels(mode=self.mode).inc()
        self.metrics.admitted.labels(mode=self.mode).inc()
        return Reservation(
            request_id=request.request_id,
            tenant_id=request.tenant_id,
            amount=request.estimated_cost,
            tokens=rate_tokens(request),
            headers=headers,
        )

    def _finish_locally(self, reservation: Reservation, actual_cost: int, now_ms: int) -> Hold | None:
        assert actual_cost >= 0, f"actual cost must be non-negative, got {actual_cost}"
        if actual_cost > reservation.amount:
            logger.warning(
                "request %s cost %d, more than the %d reserved",
                reservation.request_id,
                actual_cost,
                reservation.amount,
            )
        hold = self.holds.finish(
            reservation.request_id, actual_cost, now_ms + self.settings.settle_timeout_ms
        )
        if hold is not None:
            reservation.amount = actual_cost
        return hold

    def _release_locally(self, reservation: Reservation) -> Hold | None:
        hold = self.holds.drop(reservation.request_id)
        if hold is not None:
            self._forget([hold], "released")
        return hold

    def _forget(self, holds: list[Hold], how: str) -> None:
        for hold in holds:
            self.view.unwatch(hold.tenant_id, hold.request_id)
            self.metrics.reservations_open.labels(mode=self.mode).dec()
            self.metrics.settled.labels(how=how).inc()

    def _folded(self, tenant_id: str, request_id: str, balance: PublishedBalance) -> None:
        """The view's balance now includes the request's usage: the hold has done its job."""
        hold = self.holds.drop(request_id)
        if hold is None:
            return  # another admission's request (several share a view in tests and benchmarks)
        self.metrics.reservations_open.labels(mode=self.mode).dec()
        self.metrics.settled.labels(how="folded").inc()
        self._settled(hold, balance)

    def _settled(self, hold: Hold, balance: PublishedBalance) -> None:
        """Mode hook: the hold was dropped locally because `balance` includes its usage."""

    async def _sweep_forever(self) -> None:
        interval_s = self.settings.hold_sweep_interval_ms / 1000
        while True:
            await asyncio.sleep(interval_s)
            expired = self.sweep(self.clock_ms())
            if expired:
                logger.info("%d holds timed out", expired)
