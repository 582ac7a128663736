"""Picking a worker by load and observed latency: `BalancedPool`, a `WorkerPool` whose candidates are
ordered by each worker's queue depth (waiting + running, polled from its /health every
`worker_load_poll_interval_ms`) and then by the time its recent requests took to their first event (an
exponentially weighted mean, `LATENCY_WEIGHT_NEW` for the newest), instead of plain rotation; ties keep
the rotation, so equal workers still share the load. Retries, breakers and backpressure are the pool's.

The Responses API's model router uses one per version (gateway.responses_routes); a worker that cannot be
polled keeps its last known load (its breaker handles failures). Queue depth counts every gateway's
requests, since it is the worker's own count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import httpx

from gateway.settings import GatewaySettings
from gateway.workers import GenerateCall, WorkerClient, WorkerPool, WorkerStream

logger = logging.getLogger(__name__)

LATENCY_WEIGHT_NEW = 0.2  # the newest observation's weight in a worker's latency mean
HEALTH_TIMEOUT_S = 1.0  # one /health poll


def order_by_load(
    workers: list[WorkerClient], depth: dict[str, int], latency_ms: dict[str, float]
) -> list[WorkerClient]:
    """Least queued first, then fastest to a first event (unknown latency counts as fastest, so a new
    worker gets tried); a stable sort keeps the given (rotated) order among equals."""
    return sorted(workers, key=lambda worker: (depth.get(worker.url, 0), latency_ms.get(worker.url, 0.0)))


class BalancedPool(WorkerPool):
    def __init__(self, settings: GatewaySettings, internal_token: str) -> None:
        super().__init__(settings, internal_token)
        self.depth: dict[str, int] = {}
        self.latency_ms: dict[str, float] = {}
        self._poller: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None

    def candidates(self) -> list[WorkerClient]:
        return order_by_load(super().candidates(), self.depth, self.latency_ms)

    async def open(self, call: GenerateCall, deadline_ms: float, now_ms: Callable[[], float]) -> WorkerStream:
        started_ms = now_ms()
        stream = await super().open(call, deadline_ms, now_ms)
        url = stream.worker.url
        observed = now_ms() - started_ms
        previous = self.latency_ms.get(url)
        self.latency_ms[url] = (
            observed if previous is None else previous + LATENCY_WEIGHT_NEW * (observed - previous)
        )
        self.depth[url] = self.depth.get(url, 0) + 1  # until the next poll says otherwise
        return stream

    async def poll_once(self) -> None:
        assert self._client is not None, "started"
        for worker in self.workers:
            try:
                report = (await self._client.get(worker.url + "/health")).json()
                self.depth[worker.url] = int(report["waiting"]) + int(report["running"])
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
                logger.debug("polling %s for its load failed: %s", worker.url, error)

    async def _poll(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.settings.worker_load_poll_interval_ms / 1000)

    def start(self) -> None:
        assert self._poller is None, "started once"
        self._client = httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S)
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._client is not None:
            await self._client.aclose()
        await super().close()
