"""Strict mode on real Postgres: two gateways (two admissions, two engines, two views) never overspend."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission.base import CreditExhausted
from gateway.admission.settings import AdmissionSettings
from gateway.admission.strict import StrictAdmission
from storage.database import build_async_engine
from tests.gateway.admission.helpers import (
    ManualClock,
    admission_request,
    balance_record,
    mark_caught_up,
    new_view,
    usage_record,
)

pytestmark = pytest.mark.postgres

SETTLE_WAIT_S = 10


@pytest.fixture
async def gateways(database_url, database_settings):
    """Two gateways with their own engine and view, both fed a balance of 1000; one clock."""
    clock = ManualClock()
    engines = [build_async_engine(database_url, database_settings) for _ in range(2)]
    admissions = []
    for engine in engines:
        view = new_view()
        view.apply_balance_records([balance_record("acme", 1_000, applied_offset=0)])
        mark_caught_up(view, clock())
        settings = AdmissionSettings(mode="strict", view_ready_wait_ms=0, hold_timeout_ms=60_000,
                                     view_staleness_max_ms=10**9)
        admission = StrictAdmission(view, settings, engine, clock_ms=clock)
        await admission.start()
        admissions.append(admission)
    yield admissions, clock
    for admission in admissions:
        await admission.stop()
    for engine in engines:
        await engine.dispose()


async def admit_or_refusal(admission, request_id: str, cost: int):
    try:
        return await admission.admit(admission_request(request_id, cost=cost))
    except CreditExhausted as refusal:
        return refusal


async def wait_until(predicate) -> None:
    async with asyncio.timeout(SETTLE_WAIT_S):
        while not await predicate():
            await asyncio.sleep(0.02)


async def test_two_gateways_racing_for_the_last_credits_never_overspend(gateways):
    (a, b), _ = gateways
    outcomes = await asyncio.gather(*(
        admit_or_refusal(a if n % 2 else b, f"r{n}", 150) for n in range(60)
    ))
    admitted = [o for o in outcomes if not isinstance(o, CreditExhausted)]
    assert len(admitted) == 6  # 900 <= 1000 < 1050, whichever gateway took them
    assert sum(r.amount for r in admitted) <= 1_000
    assert await a.available("acme") == 100
    refusal = next(o for o in outcomes if isinstance(o, CreditExhausted))
    assert refusal.headers["x-should-retry"] == "false" and "100 are available" in refusal.message


async def test_a_folded_hold_leaves_postgres_and_the_owner_row_keeps_the_newest_balance(gateways):
    (a, b), _ = gateways
    reservation = await a.admit(admission_request("r1", cost=300))
    await a.finish(reservation, 120)
    assert await b.available("acme") == 880
    a.view.apply_event_records([usage_record("acme", "r1", 120, offset=7)])
    a.view.apply_balance_records([balance_record("acme", 880, applied_offset=7)])

    async def settled() -> bool:
        spendable, held = await a.store.snapshot("acme", a.clock_ms())
        return (spendable, held) == (880, 0)

    await wait_until(settled)
    # b's view still says 1000 at offset 0: the owner row keeps a's newer 880.
    await b.admit(admission_request("r2", cost=880))
    with pytest.raises(CreditExhausted):
        await b.admit(admission_request("r3", cost=1))


async def test_release_deletes_the_hold_and_a_timed_out_hold_stops_counting(gateways):
    (a, b), clock = gateways
    reservation = await a.admit(admission_request("r1", cost=1_000))
    with pytest.raises(CreditExhausted):
        await b.admit(admission_request("r2", cost=1))
    await a.release(reservation)
    await b.admit(admission_request("r2", cost=1_000))
    clock.advance(59_999)
    with pytest.raises(CreditExhausted):
        await a.admit(admission_request("r3", cost=1))
    clock.advance(1)  # r2 was never finished nor released: its hold times out
    await a.admit(admission_request("r3", cost=1_000))


async def test_a_tenant_no_view_has_a_balance_for_gets_nothing(gateways):
    (a, _), _ = gateways
    with pytest.raises(CreditExhausted):
        await a.admit(admission_request("r1", tenant_id="nobody", cost=1))
    await a.admit(admission_request("r2", tenant_id="nobody", cost=0))


async def test_an_admission_cancelled_mid_transaction_leaves_no_hold(gateways):
    (a, b), _ = gateways
    for yields in range(6):  # cancel at different points of the round trip
        task = asyncio.create_task(a.admit(admission_request(f"cancelled-{yields}", cost=1_000)))
        for _ in range(yields):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def no_holds() -> bool:
        return (await a.store.snapshot("acme", a.clock_ms()))[1] == 0

    await wait_until(no_holds)
    await b.admit(admission_request("after", cost=1_000))
