"""Admission's Prometheus metrics: open reservations, rejections by reason, and the balance view's lag.

They live in the default prometheus_client registry (`default_metrics()`); `collectors()` hands the same
objects to a gateway that serves a registry of its own (gateway.metrics.GatewayMetrics(collectors=...)).
Tests build `AdmissionMetrics(CollectorRegistry())` to read values in isolation.
"""

from __future__ import annotations

from functools import lru_cache

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.registry import Collector

# The reasons a request is refused by admission (the `reason` label).
REASON_CREDIT = "credit_balance_exhausted"
REASON_REQUESTS_PER_MINUTE = "requests_per_minute"
REASON_TOKENS_PER_MINUTE = "tokens_per_minute"
REASON_REQUEST_TOO_LARGE = "request_too_large"
REASON_VIEW_NOT_READY = "balance_view_not_ready"
REASON_VIEW_STALE = "balance_view_stale"
REASON_TOO_MANY_HOLDS = "tenant_holds_max"
REASON_STORE_UNAVAILABLE = "reservation_store_unavailable"


class AdmissionMetrics:
    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        self.reservations_open = Gauge(
            "tollgate_admission_reservations_open",
            "Reservations this process holds: admitted and running, or finished and waiting for the fold",
            ["mode"],
            registry=registry,
        )
        self.admitted = Counter(
            "tollgate_admission_admitted", "Requests admitted", ["mode"], registry=registry
        )
        self.rejections = Counter(
            "tollgate_admission_rejections",
            "Requests refused by admission, by reason",
            ["reason"],
            registry=registry,
        )
        self.settled = Counter(
            "tollgate_admission_holds_settled",
            "Holds dropped, by how: folded (the balance includes the usage), released, timed_out",
            ["how"],
            registry=registry,
        )
        self.view_lag_records = Gauge(
            "tollgate_ledger_view_lag_records",
            "Records on the log the balance view has not read yet (consumer lag), by topic",
            ["topic"],
            registry=registry,
        )
        self.view_staleness_seconds = Gauge(
            "tollgate_ledger_view_staleness_seconds",
            "Since when the balance view is known to hold everything the log had (0: caught up at the last check)",  # noqa: E501
            registry=registry,
        )

    def collectors(self) -> list[Collector]:
        return [
            self.reservations_open,
            self.admitted,
            self.rejections,
            self.settled,
            self.view_lag_records,
            self.view_staleness_seconds,
        ]


@lru_cache(maxsize=1)
def default_metrics() -> AdmissionMetrics:
    """The process-wide metrics in the default registry (created once: a name registers only once)."""
    return AdmissionMetrics(REGISTRY)
