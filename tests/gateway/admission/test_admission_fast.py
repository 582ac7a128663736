"""Fast mode over a view fed by hand: the last credits under concurrency, settling, release, timeouts."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission.base import CreditExhausted, Overloaded, RateLimited
from gateway.admission.fast import FastAdmission
from gateway.admission.settings import AdmissionSettings, TierLimits
from tests.gateway.admission.helpers import (
    START_MS,
    ManualClock,
    admission_request,
    balance_record,
    mark_caught_up,
    new_view,
    usage_record,
)


def fast_admission(balance: int | None = 1_000, **settings) -> tuple[FastAdmission, ManualClock]:
    clock = ManualClock()
    view = new_view()
    if balance is not None:
        view.apply_balance_records([balance_record("acme", balance, applied_offset=0)])
    mark_caught_up(view, clock.now_ms)
    values = {"view_ready_wait_ms": 0, **settings}
    return FastAdmission(view, AdmissionSettings(**values), clock_ms=clock), clock


def sample(admission: FastAdmission, name: str, **labels) -> float:
    metric = getattr(admission.metrics, name)
    return (metric.labels(**labels) if labels else metric)._value.get()


async def test_concurrent_requests_for_the_last_credits_admit_exactly_what_the_balance_covers():
    admission, _ = fast_admission(1_000)

    async def attempt(n: int):
        await asyncio.sleep(0)
        try:
            return await admission.admit(admission_request(f"r{n}", cost=150))
        except CreditExhausted as refusal:
            return refusal

    outcomes = await asyncio.gather(*(attempt(n) for n in range(200)))
    refusals = [o for o in outcomes if isinstance(o, CreditExhausted)]
    assert len(outcomes) - len(refusals) == 6  # 6 x 150 = 900 <= 1000 < 7 x 150
    assert admission.available("acme", START_MS) == 100
    refusal = refusals[0]
    assert (refusal.status_code, refusal.error_type, refusal.code) == (
        429,
        "insufficient_quota",
        "credit_balance_exhausted",
    )
    assert refusal.headers["x-should-retry"] == "false"
    assert "x-ratelimit-remaining-requests" in refusal.headers
    assert sample(admission, "rejections", reason="credit_balance_exhausted") == 194
    assert sample(admission, "reservations_open", mode="fast") == 6


async def test_a_free_request_is_admitted_without_credit():
    admission, _ = fast_admission(None)
    reservation = await admission.admit(admission_request("free", cost=0))
    assert reservation.amount == 0
    with pytest.raises(CreditExhausted):
        await admission.admit(admission_request("paid", cost=1))


async def test_finished_hold_settles_when_the_usage_event_then_a_balance_including_it_arrive():
    admission, _ = fast_admission(1_000)
    view = admission.view
    reservation = await admission.admit(admission_request("r1", cost=300))
    await admission.finish(reservation, 120)
    assert admission.available("acme", START_MS) == 880

    view.apply_event_records([usage_record("acme", "r1", 120, offset=7)])
    assert admission.available("acme", START_MS) == 880  # the balance does not include it yet
    view.apply_balance_records([balance_record("acme", 1_000, applied_offset=6)])
    assert admission.holds.total("acme") == 120  # an older batch's balance: still held
    view.apply_balance_records([balance_record("acme", 880, applied_offset=7)])
    assert admission.holds.total("acme") == 0
    assert admission.available("acme", START_MS) == 880
    assert sample(admission, "settled", how="folded") == 1
    assert view.watched_count() == 0


async def test_finished_hold_settles_when_the_balance_arrives_before_the_usage_event():
    admission, _ = fast_admission(1_000)
    view = admission.view
    reservation = await admission.admit(admission_request("r1", cost=300))
    await admission.finish(reservation, 120)
    view.apply_balance_records([balance_record("acme", 880, applied_offset=9)])
    assert admission.available("acme", START_MS) == 760  # counted twice until we know it is in there
    view.apply_event_records([usage_record("acme", "r1", 120, offset=9)])
    assert admission.available("acme", START_MS) == 880


async def test_usage_folded_before_finish_drops_the_hold_and_finish_is_a_no_op():
    admission, _ = fast_admission(1_000)
    reservation = await admission.admit(admission_request("r1", cost=300))
    admission.view.apply_event_records([usage_record("acme", "r1", 120, offset=3)])
    admission.view.apply_balance_records([balance_record("acme", 880, applied_offset=3)])
    await admission.finish(reservation, 120)
    assert admission.available("acme", START_MS) == 880
    assert admission.holds.open_count() == 0


async def test_release_gives_the_hold_back():
    admission, _ = fast_admission(1_000)
    reservation = await admission.admit(admission_request("r1", cost=600))
    with pytest.raises(CreditExhausted):
        await admission.admit(admission_request("r2", cost=600))
    await admission.release(reservation)
    await admission.admit(admission_request("r2", cost=600))
    assert sample(admission, "settled", how="released") == 1
    assert admission.view.watched_count() == 1


async def test_a_hold_whose_request_never_ends_is_released_after_the_hold_timeout():
    admission, clock = fast_admission(1_000, hold_timeout_ms=60_000)
    await admission.admit(admission_request("stuck", cost=1_000))
    clock.advance(59_999)
    mark_caught_up(admission.view, clock())
    assert admission.sweep(clock()) == 0
    with pytest.raises(CreditExhausted):
        await admission.admit(admission_request("r2", cost=1))
    clock.advance(1)
    mark_caught_up(admission.view, clock())
    await admission.admit(admission_request("r2", cost=1))  # admit expires the tenant's timed-out holds
    assert sample(admission, "settled", how="timed_out") == 1
    assert admission.view.watched_count() == 1


async def test_a_finished_hold_that_is_never_folded_expires_after_the_settle_timeout():
    admission, clock = fast_admission(1_000, hold_timeout_ms=60_000, settle_timeout_ms=5_000)
    reservation = await admission.admit(admission_request("r1", cost=500))
    clock.advance(50_000)
    await admission.finish(reservation, 400)  # the deadline moves to finish + settle timeout
    clock.advance(4_999)
    assert admission.sweep(clock()) == 0
    assert admission.holds.total("acme") == 400
    clock.advance(1)
    assert admission.sweep(clock()) == 1
    assert admission.holds.open_count() == 0


async def test_expired_blocks_stop_counting_at_their_expiry():
    clock = ManualClock()
    view = new_view()
    view.apply_balance_records([balance_record("acme", 1_000, 0, expiring=((START_MS + 1_000, 600),))])
    admission = FastAdmission(view, AdmissionSettings(view_ready_wait_ms=0), clock_ms=clock)
    mark_caught_up(view, clock())
    assert admission.available("acme", clock()) == 1_000
    clock.advance(1_000)
    mark_caught_up(view, clock())
    assert admission.available("acme", clock()) == 400
    with pytest.raises(CreditExhausted):
        await admission.admit(admission_request("r1", cost=401))


async def test_a_view_that_is_not_ready_or_stale_refuses_with_503():
    clock = ManualClock()
    admission = FastAdmission(
        new_view(), AdmissionSettings(view_ready_wait_ms=0, view_staleness_max_ms=1_000), clock_ms=clock
    )
    with pytest.raises(Overloaded) as not_ready:
        await admission.admit(admission_request("r1"))
    assert not_ready.value.status_code == 503 and not_ready.value.headers["retry-after"] == "1"
    admission.view.apply_balance_records([balance_record("acme", 1_000, 0)])
    mark_caught_up(admission.view, clock())
    await admission.admit(admission_request("r1"))
    clock.advance(1_001)
    with pytest.raises(Overloaded, match="behind the ledger"):
        await admission.admit(admission_request("r2"))
    assert sample(admission, "rejections", reason="balance_view_stale") == 1
    assert sample(admission, "rejections", reason="balance_view_not_ready") == 1


async def test_rate_limit_refusal_reserves_no_credit_and_says_when_to_retry():
    tiers = {"free": TierLimits(requests_per_minute=2, tokens_per_minute=1_000)}
    admission, _ = fast_admission(1_000, tiers=tiers, tier_default="free")
    first = await admission.admit(admission_request("r1", tier="free", cost=10))
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-remaining-tokens"] == "970"
    await admission.admit(admission_request("r2", tier="free", cost=10))
    with pytest.raises(RateLimited) as refused:
        await admission.admit(admission_request("r3", tier="free", cost=10))
    assert refused.value.code == "rate_limit_exceeded"
    assert refused.value.headers["retry-after"] == "30"  # 2 per minute: one more in 30 s
    assert admission.holds.total("acme") == 20


async def test_too_many_holds_for_one_tenant_refuses_with_503():
    admission, _ = fast_admission(1_000, tenant_holds_max=2)
    await admission.admit(admission_request("r1", cost=1))
    await admission.admit(admission_request("r2", cost=1))
    with pytest.raises(Overloaded):
        await admission.admit(admission_request("r3", cost=1))


async def test_sweeper_task_runs_in_the_background():
    admission, clock = fast_admission(1_000, hold_timeout_ms=10, hold_sweep_interval_ms=5)
    await admission.admit(admission_request("r1", cost=100))
    clock.advance(10)
    await admission.start()
    try:
        for _ in range(200):
            if admission.holds.open_count() == 0:
                break
            await asyncio.sleep(0.01)
    finally:
        await admission.stop()
    assert admission.holds.open_count() == 0


async def test_gateways_racing_for_one_tenant_overspend_at_most_one_request_each():
    """Each of N processes holds at most its share of the balance, or one request: total <= balance + N x
    cost."""
    gateways = [
        fast_admission(1_000, gateway_processes=3)[0] for _ in range(3)
    ]  # three processes, one balance

    async def attempt(n: int):
        await asyncio.sleep(0)
        try:
            return await gateways[n % 3].admit(admission_request(f"r{n}", cost=150))
        except CreditExhausted:
            return None

    admitted = [r for r in await asyncio.gather(*(attempt(n) for n in range(300))) if r is not None]
    spent = sum(r.amount for r in admitted)
    assert spent <= 1_000 + 3 * 150
    assert spent >= 1_000 - 3 * 150, "shares do not strand more than a request per process"


async def test_a_request_larger_than_the_share_runs_when_the_process_holds_nothing_else():
    admission, _ = fast_admission(1_000, gateway_processes=4)  # share 250
    big = await admission.admit(admission_request("big", cost=900))
    assert big.amount == 900
    with pytest.raises(CreditExhausted):
        await admission.admit(admission_request("second", cost=50))  # 900 held: past its share
