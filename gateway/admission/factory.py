"""Wiring for the gateway's lifespan: the balance view, its feed from the event log, and the admission
of the configured mode, started and stopped together.

    runtime = AdmissionRuntime.create(event_log, AdmissionSettings(), engine=async_engine)
    await runtime.start()          # the view starts reading ledger.balances; admit() waits for it
    admission = runtime.admission  # implements gateway.admission.base.Admission
    ...
    await runtime.stop()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.admission.fast import FastAdmission
from gateway.admission.metrics import AdmissionMetrics, default_metrics
from gateway.admission.settings import AdmissionSettings
from gateway.admission.strict import StrictAdmission
from gateway.ledger_view import LedgerView, LedgerViewFeed, wall_clock_ms
from streams.log import EventLog


def build_admission(
    settings: AdmissionSettings,
    view: LedgerView,
    *,
    engine: AsyncEngine | None = None,
    metrics: AdmissionMetrics | None = None,
    clock_ms: Callable[[], int] = wall_clock_ms,
) -> FastAdmission | StrictAdmission:
    if settings.mode == "strict":
        if engine is None:
            raise ValueError("strict admission needs a database engine (TOLLGATE_ADMISSION_MODE=strict)")
        return StrictAdmission(view, settings, engine, metrics=metrics, clock_ms=clock_ms)
    # The engine (when given) reads keys' usage for their budgets.
    return FastAdmission(view, settings, metrics=metrics, clock_ms=clock_ms, engine=engine)


@dataclass
class AdmissionRuntime:
    view: LedgerView
    feed: LedgerViewFeed
    admission: FastAdmission | StrictAdmission

    @classmethod
    def create(
        cls,
        log: EventLog,
        settings: AdmissionSettings,
        *,
        engine: AsyncEngine | None = None,
        metrics: AdmissionMetrics | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ) -> AdmissionRuntime:
        metrics = metrics or default_metrics()
        view = LedgerView(log.topics, log.partitions, metrics=metrics)
        feed = LedgerViewFeed(log, view, settings, clock_ms=clock_ms)
        admission = build_admission(settings, view, engine=engine, metrics=metrics, clock_ms=clock_ms)
        return cls(view, feed, admission)

    async def start(self) -> None:
        await self.feed.start()
        await self.admission.start()

    async def stop(self) -> None:
        await self.admission.stop()
        await self.feed.stop()
