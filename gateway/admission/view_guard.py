"""Admission refuses (503, retryable) rather than trust a balance view that is not current.

A view still reading the balances at start-up, or one that has not caught up with the log for
`view_staleness_max_ms`, would let a tenant spend credit the ledger has already consumed.
"""

from __future__ import annotations

import asyncio
import contextlib

from gateway.admission.base import Overloaded
from gateway.admission.metrics import REASON_TOO_MANY_HOLDS, REASON_VIEW_NOT_READY, REASON_VIEW_STALE
from gateway.admission.settings import AdmissionSettings
from gateway.ledger_view import LedgerView


class BalanceViewNotReady(Overloaded):
    reason = REASON_VIEW_NOT_READY


class BalanceViewStale(Overloaded):
    reason = REASON_VIEW_STALE


class TooManyHolds(Overloaded):
    reason = REASON_TOO_MANY_HOLDS


async def require_fresh_view(view: LedgerView, settings: AdmissionSettings, now_ms: int) -> None:
    """Wait up to view_ready_wait_ms for a view that is starting; raise when it is not ready or stale."""
    retry_after = {"retry-after": str(settings.view_unavailable_retry_after_s)}
    if not view.ready.is_set() and settings.view_ready_wait_ms > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(view.ready.wait(), settings.view_ready_wait_ms / 1000)
    staleness_ms = view.staleness_ms(now_ms)
    if staleness_ms is None:
        raise BalanceViewNotReady(
            "The gateway is still reading the credit balances; try again shortly.", headers=retry_after
        )
    if staleness_ms > settings.view_staleness_max_ms:
        raise BalanceViewStale(
            f"The gateway's credit balances are {staleness_ms} ms behind the ledger "
            f"(limit {settings.view_staleness_max_ms} ms); try again shortly.",
            headers=retry_after,
        )


def too_many_holds(tenant_id: str, settings: AdmissionSettings) -> TooManyHolds:
    return TooManyHolds(
        f"Too many requests in flight for this organization on this gateway (limit {settings.tenant_holds_max}).",  # noqa: E501
        headers={"retry-after": "1"},
    )
