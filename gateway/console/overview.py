"""The overview's live numbers, from the components' own metrics and state.

This gateway's Prometheus registry (the one `/metrics` serves): requests answered (a rate between two
refreshes of the page), refusals by reason, the balance view's lag behind the log (records of
ledger.events no published balance includes yet: the stream processor's lag plus the view's own) and its
staleness. Each worker's `/health` (open, no token): its waiting and running sequences. In the
distributed deployment these are the numbers of the gateway that served the page (each gateway has its
own registry) and of the workers it is configured with; a worker that does not answer within
`worker_health_timeout_ms` is shown as unreachable, a metric this process does not have as "not here".
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import httpx
from prometheus_client import CollectorRegistry

REQUESTS = "tollgate_gateway_requests"
REJECTIONS = "tollgate_gateway_rejections"
VIEW_LAG = "tollgate_ledger_view_lag_records"
VIEW_STALENESS = "tollgate_ledger_view_staleness_seconds"


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    requests_total: float
    rejections: dict[str, float]
    lag_records: dict[str, float] | None  # by topic; None: this process has no balance view
    staleness_s: float | None


def snapshot(registry: CollectorRegistry | None) -> MetricsSnapshot:
    requests, rejections, lag, staleness = 0.0, {}, None, None
    for family in registry.collect() if registry is not None else ():
        for sample in family.samples:
            if sample.name == REQUESTS + "_total":
                requests += sample.value
            elif sample.name == REJECTIONS + "_total" and sample.value:
                reason = sample.labels.get("reason", "")
                rejections[reason] = rejections.get(reason, 0.0) + sample.value
            elif sample.name == VIEW_LAG:
                lag = lag or {}
                lag[sample.labels.get("topic", "")] = sample.value
            elif sample.name == VIEW_STALENESS:
                staleness = sample.value
    return MetricsSnapshot(requests, dict(sorted(rejections.items())), lag, staleness)


@dataclass
class RateMeter:
    """Requests per second between the two latest reads of the request counter (one per page refresh)."""

    last: tuple[float, float] | None = None  # (seconds, total)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def rate(self, now_s: float, total: float) -> float | None:
        with self.lock:
            previous, self.last = self.last, (now_s, total)
        if previous is None or now_s <= previous[0]:
            return None
        return max(0.0, (total - previous[1]) / (now_s - previous[0]))


@dataclass(frozen=True, slots=True)
class WorkerState:
    url: str
    waiting: int | None  # None: unreachable
    running: int | None
    status: str


async def workers(urls: list[str], timeout_ms: int) -> list[WorkerState]:
    async with httpx.AsyncClient(timeout=timeout_ms / 1000) as client:
        return list(await asyncio.gather(*(_worker(client, url) for url in urls)))


async def _worker(client: httpx.AsyncClient, url: str) -> WorkerState:
    try:
        response = await client.get(url.rstrip("/") + "/health")
        report = response.json()
        return WorkerState(url, int(report["waiting"]), int(report["running"]), str(report["status"]))
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return WorkerState(url, None, None, "unreachable")
