"""The canary's window is the deployment's: gateways share their outcomes through Postgres
(`rollout_outcomes`), so two gateways that each saw too few requests to judge roll the canary back
together; a new rollout starts from an empty window, and a rollback clears the alias's outcomes."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from gateway.metrics import GatewayMetrics
from gateway.router import CANARY, ROLLED_BACK, STABLE, ModelRouter, Routed, RouteStore
from gateway.settings import GatewaySettings
from storage.conversations import RolloutOutcome
from tests.gateway.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.postgres

ALIAS = "chat"


class Clock:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def gateway_router(session_factory, clock: Clock, **overrides) -> ModelRouter:
    values = dict(
        admin_token=ADMIN_TOKEN,
        route_cache_ttl_ms=0,
        rollout_window_ms=60_000,
        rollout_window_requests_min=10,
        rollout_error_rate_margin_percent=5,
        rollout_share_interval_ms=0,
    )
    settings = GatewaySettings(**{**values, **overrides})
    return ModelRouter(settings, RouteStore(session_factory), GatewayMetrics(), None, {}, wall_clock_ms=clock)


async def observe(router: ModelRouter, requests: int, canary_failed: bool) -> None:
    for _ in range(requests):
        await router.observe(Routed(ALIAS, "tiny-v1", STABLE), failed=False, ttft_ms=50.0)
        await router.observe(Routed(ALIAS, "tiny-v2", CANARY), failed=canary_failed, ttft_ms=50.0)


async def outcomes_kept(session_factory) -> int:
    async with session_factory() as session:
        return await session.scalar(select(func.count()).select_from(RolloutOutcome))


async def test_two_gateways_judge_the_canary_over_both_windows(session_factory):
    clock = Clock(1_000_000)
    store = RouteStore(session_factory)
    await store.set_route(ALIAS, "tiny-v1", "tiny-v2", 50, clock())
    first, second = gateway_router(session_factory, clock), gateway_router(session_factory, clock)

    await observe(first, 6, canary_failed=True)  # 6 of each: too few for one gateway to judge
    assert (await store.get(ALIAS)).state == CANARY
    await observe(second, 4, canary_failed=True)  # 10 of each across the two
    route = await store.get(ALIAS)
    assert route.state == ROLLED_BACK
    assert route.reason.startswith("automatic: canary error rate 100.0% vs stable 0.0%")
    assert await outcomes_kept(session_factory) == 0, "a rollback clears the alias's outcomes"


async def test_a_new_rollout_and_the_window_start_empty(session_factory):
    clock = Clock(1_000_000)
    store = RouteStore(session_factory)
    await store.set_route(ALIAS, "tiny-v1", "tiny-v2", 50, clock())
    first = gateway_router(session_factory, clock)
    await observe(first, 9, canary_failed=True)
    assert (await store.get(ALIAS)).state == CANARY

    clock.now_ms += 1
    await store.set_route(ALIAS, "tiny-v1", "tiny-v3", 50, clock())  # another canary: judged afresh
    second = gateway_router(session_factory, clock, rollout_error_rate_margin_percent=20)
    await observe(second, 9, canary_failed=False)
    await observe(second, 1, canary_failed=True)  # 10% errors, within the margin: the old 100% not counted
    assert (await store.get(ALIAS)).state == CANARY

    clock.now_ms += 60_001  # everything so far leaves the window
    await observe(second, 1, canary_failed=False)
    assert await outcomes_kept(session_factory) == 2, "outcomes older than the window are deleted"
