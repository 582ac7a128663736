"""The model router and its control plane: a model name a client uses is an alias over versions (model
registry entries), with a stable version and, during a rollout, a canary taking a set percentage of the
alias's traffic; promotion and rollback by the admin API, and an automatic rollback when the canary does
worse than the stable version over a window.

    route(alias, sticky_key, pinned_model) -> Routed(alias, model, role)

The route of an alias is a row of `model_routes` (storage.conversations.ModelRoute), read through a cache
of `route_cache_ttl_ms`; an alias without a row is served by the registry entry of that name. The canary
share is sticky: a request's bucket (0..99) is a hash of the alias and its sticky key (the conversation
id; a request continuing a previous response is pinned to the version that served it while that version
is still the alias's stable or canary; else the request id), and buckets below `canary_percent` go to
the canary. So a conversation stays on one version for the whole rollout.

Every response names the version that served it (`model` in its body), and so does its usage: the
worker bills with the registry entry it serves, whose price is the one charged (the served version's).
A version's workers are `model_worker_urls[version]` (each version gets its own worker pool), else the
gateway's `worker_urls`.

Automatic rollback (`CanaryWatch`): every routed request's outcome (failed or not, its time to first
token) during a rollout is kept for `rollout_window_ms`; once both versions have at least
`rollout_window_requests_min` requests in the window, the canary is rolled back when its error rate
exceeds the stable version's by more than `rollout_error_rate_margin_percent` points, or its
time-to-first-token p99 exceeds the stable version's by more than `rollout_ttft_p99_margin_ms`. The window
is the deployment's, not one gateway's: each gateway writes its outcomes to `rollout_outcomes` at most
every `rollout_share_interval_ms` and judges over every gateway's outcomes of the window since the rollout
began (`RouteStore.share_outcomes`), so N gateways reach a verdict as soon as one would with all the
traffic; in between, a gateway whose own outcomes (with the window it last read) already call for a
rollback shares and judges at once. A rollback sets the canary's share to 0 (state `rolled_back`, with
the reason) in Postgres, so every gateway follows within its cache TTL, and clears the alias's outcomes.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.completions import CompletionService
from gateway.errors import ApiError
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from gateway.ttl_cache import TtlCache
from storage.conversations import ModelRoute, RolloutOutcome

logger = logging.getLogger(__name__)

STABLE = "stable"
CANARY = "canary"
ROLLED_BACK = "rolled_back"
WINDOW_OBSERVATIONS_MAX = 10_000  # outcomes one alias's window keeps at most
ROUTES_CACHED_MAX = 10_000  # model aliases whose route the gateway keeps cached


@dataclass(frozen=True, slots=True)
class Route:
    alias: str
    stable_model: str
    canary_model: str | None
    canary_percent: int
    state: str
    reason: str | None
    since_ms: int = 0  # when the route was last set: a rollout's outcomes are those from then on

    def view(self) -> dict:
        return {
            "alias": self.alias,
            "stable_model": self.stable_model,
            "canary_model": self.canary_model,
            "canary_percent": self.canary_percent,
            "state": self.state,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Routed:
    alias: str
    model: str  # the registry entry (version) that serves the request
    role: str  # stable | canary


def _route_of(row: ModelRoute) -> Route:
    return Route(
        row.alias,
        row.stable_model,
        row.canary_model,
        row.canary_percent,
        row.state,
        row.reason,
        row.updated_at_ms,
    )


class RouteStore:
    """The `model_routes` rows: read by the router, written by the admin API and the automatic rollback."""

    def __init__(self, session_factory: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = session_factory

    async def get(self, alias: str) -> Route | None:
        async with self._sessions() as session:
            row = await session.get(ModelRoute, alias)
            return None if row is None else _route_of(row)

    async def _write(self, alias: str, values: dict, now_ms: int) -> Route:
        values = {**values, "updated_at_ms": now_ms}
        async with self._sessions() as session, session.begin():
            row = await session.scalar(
                insert(ModelRoute)
                .values(alias=alias, **values)
                .on_conflict_do_update(index_elements=[ModelRoute.alias], set_=values)
                .returning(ModelRoute)
            )
            return _route_of(row)

    async def set_route(
        self, alias: str, stable_model: str, canary_model: str | None, canary_percent: int, now_ms: int
    ) -> Route:
        assert 0 <= canary_percent <= 100, "a share is a percentage"
        state = CANARY if canary_model is not None and canary_percent > 0 else STABLE
        values = {
            "stable_model": stable_model,
            "canary_model": canary_model,
            "canary_percent": canary_percent if canary_model is not None else 0,
            "state": state,
            "reason": None,
        }
        return await self._write(alias, values, now_ms)

    async def _locked(self, session: AsyncSession, alias: str) -> ModelRoute:
        row = await session.scalar(select(ModelRoute).where(ModelRoute.alias == alias).with_for_update())
        if row is None:
            raise ApiError(404, f"no route for the model alias {alias!r}", param="alias", code="not_found")
        return row

    async def promote(self, alias: str, now_ms: int) -> Route:
        """The canary becomes the stable version (all traffic)."""
        async with self._sessions() as session, session.begin():
            row = await self._locked(session, alias)
            if row.canary_model is None:
                raise ApiError(409, f"{alias!r} has no canary to promote", param="alias", code="no_canary")
            row.stable_model, row.canary_model, row.canary_percent = row.canary_model, None, 0
            row.state, row.reason, row.updated_at_ms = STABLE, "promoted", now_ms
            return _route_of(row)

    async def rollback(self, alias: str, reason: str, now_ms: int) -> Route:
        """The canary gets no more traffic (kept named, with why, for the record)."""
        async with self._sessions() as session, session.begin():
            row = await self._locked(session, alias)
            if row.canary_model is None or row.state == ROLLED_BACK:
                return _route_of(row)
            row.canary_percent, row.state, row.reason, row.updated_at_ms = 0, ROLLED_BACK, reason, now_ms
            await session.execute(delete(RolloutOutcome).where(RolloutOutcome.alias == alias))
            return _route_of(row)

    async def share_outcomes(
        self, route: Route, outcomes: list[Outcome], now_ms: int, window_ms: int
    ) -> list[Outcome]:
        """Add this gateway's outcomes of the route's rollout; every gateway's in the window since the
        rollout began, oldest first (the newest WINDOW_OBSERVATIONS_MAX). Older ones are deleted."""
        since = max(route.since_ms, now_ms - window_ms)
        table = RolloutOutcome
        async with self._sessions() as session, session.begin():
            if outcomes:
                await session.execute(
                    insert(table),
                    [
                        {
                            "alias": route.alias,
                            "at_ms": o.at_ms,
                            "role": o.role,
                            "failed": o.failed,
                            "ttft_ms": o.ttft_ms,
                        }
                        for o in outcomes
                    ],
                )
            await session.execute(delete(table).where(table.alias == route.alias, table.at_ms < since))
            rows = await session.execute(
                select(table.at_ms, table.role, table.failed, table.ttft_ms)
                .where(table.alias == route.alias, table.at_ms >= since)
                .order_by(table.at_ms.desc())
                .limit(WINDOW_OBSERVATIONS_MAX)
            )
            return [Outcome(*row) for row in reversed(rows.all())]


def bucket_of(alias: str, sticky_key: str) -> int:
    """0..99, the same for an alias and key on every gateway."""
    digest = hashlib.sha256(f"{alias}\x00{sticky_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


@dataclass(frozen=True, slots=True)
class Outcome:
    at_ms: float
    role: str
    failed: bool
    ttft_ms: float | None


def p99(values: list[float]) -> float:
    assert values, "a percentile of something"
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, (99 * len(ordered) + 99) // 100 - 1)]


class CanaryWatch:
    """One alias's recent outcomes by role, and the verdict: a reason to roll the canary back, or None."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.outcomes: deque[Outcome] = deque(maxlen=WINDOW_OBSERVATIONS_MAX)

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def verdict(self, now_ms: float) -> str | None:
        settings = self.settings
        while self.outcomes and self.outcomes[0].at_ms < now_ms - settings.rollout_window_ms:
            self.outcomes.popleft()
        stable = [outcome for outcome in self.outcomes if outcome.role == STABLE]
        canary = [outcome for outcome in self.outcomes if outcome.role == CANARY]
        if min(len(stable), len(canary)) < settings.rollout_window_requests_min:
            return None
        stable_errors = 100 * sum(outcome.failed for outcome in stable) / len(stable)
        canary_errors = 100 * sum(outcome.failed for outcome in canary) / len(canary)
        if canary_errors > stable_errors + settings.rollout_error_rate_margin_percent:
            return f"canary error rate {canary_errors:.1f}% vs stable {stable_errors:.1f}%"
        stable_ttft = [outcome.ttft_ms for outcome in stable if outcome.ttft_ms is not None]
        canary_ttft = [outcome.ttft_ms for outcome in canary if outcome.ttft_ms is not None]
        if stable_ttft and canary_ttft:
            stable_p99, canary_p99 = p99(stable_ttft), p99(canary_ttft)
            if canary_p99 > stable_p99 + settings.rollout_ttft_p99_margin_ms:
                return f"canary time-to-first-token p99 {canary_p99:.0f} ms vs stable {stable_p99:.0f} ms"
        return None


class ModelRouter:
    def __init__(
        self,
        settings: GatewaySettings,
        store: RouteStore,
        metrics: GatewayMetrics,
        default_service: CompletionService,
        services: dict[str, CompletionService],
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.default_service = default_service
        self.services = services  # a version's own pool of workers, by registry entry
        self.wall_clock_ms = wall_clock_ms
        self._routes: TtlCache[str, Route | None] = TtlCache(
            self.store.get, self.settings.route_cache_ttl_ms, ROUTES_CACHED_MAX
        )
        self._unshared: dict[str, list[Outcome]] = {}  # by alias: outcomes not yet written
        self._shared_at_ms: dict[str, float] = {}  # by alias: when this gateway last shared (monotonic)
        self._windows: dict[str, list[Outcome]] = {}  # by alias: every gateway's outcomes, as last shared

    def completions_for(self, model: str) -> CompletionService:
        return self.services.get(model, self.default_service)

    async def _route(self, alias: str) -> Route | None:
        return await self._routes.get(alias)

    async def route(self, alias: str, sticky_key: str, pinned_model: str | None = None) -> Routed:
        route = await self._route(alias)
        if route is None:
            if alias not in self.settings.models:
                raise ApiError(
                    404, f"The model {alias!r} does not exist", param="model", code="model_not_found"
                )
            routed = Routed(alias, alias, STABLE)
        elif (
            route.canary_model is not None and pinned_model == route.canary_model and route.canary_percent > 0
        ):
            routed = Routed(alias, route.canary_model, CANARY)
        elif pinned_model == route.stable_model:
            routed = Routed(alias, route.stable_model, STABLE)
        elif route.canary_model is not None and bucket_of(alias, sticky_key) < route.canary_percent:
            routed = Routed(alias, route.canary_model, CANARY)
        else:
            routed = Routed(alias, route.stable_model, STABLE)
        self.metrics.routed_requests.labels(alias, routed.model, routed.role).inc()
        return routed

    async def observe(self, routed: Routed, failed: bool, ttft_ms: float | None) -> None:
        """A routed request's outcome. Shares this gateway's outcomes and judges the rollout over every
        gateway's when `rollout_share_interval_ms` has passed, or at once when the outcomes it knows (the
        last shared window and its own since) already call for a rollback; rolls the canary back if so."""
        route = await self._route(routed.alias)
        if route is None or route.state != CANARY:
            return
        alias, now = routed.alias, self.wall_clock_ms()
        unshared = self._unshared.setdefault(alias, [])
        unshared.append(Outcome(now, routed.role, failed, ttft_ms))
        shared_at, monotonic_ms = self._shared_at_ms.get(alias), time.monotonic() * 1000
        due = (
            shared_at is None
            or monotonic_ms - shared_at >= self.settings.rollout_share_interval_ms
            or len(unshared) >= WINDOW_OBSERVATIONS_MAX
        )
        if not due and self._verdict([*self._windows.get(alias, ()), *unshared], now) is None:
            return
        self._shared_at_ms[alias], self._unshared[alias] = monotonic_ms, []
        window = await self.store.share_outcomes(route, unshared, now, self.settings.rollout_window_ms)
        self._windows[alias] = window
        reason = self._verdict(window, now)
        if reason is None:
            return
        rolled_back = await self.store.rollback(alias, f"automatic: {reason}", self.wall_clock_ms())
        self._routes.put(alias, rolled_back)
        self._unshared.pop(alias, None)
        self._windows.pop(alias, None)
        self.metrics.rollbacks.labels(alias, "automatic").inc()
        logger.warning("rolled back the canary of %s: %s", alias, reason)

    def _verdict(self, outcomes: list[Outcome], now_ms: int) -> str | None:
        watch = CanaryWatch(self.settings)
        for outcome in outcomes:
            watch.add(outcome)
        return watch.verdict(now_ms)
