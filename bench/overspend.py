"""Overspend benchmark: `python -m bench.overspend` prints one JSON line.

Two gateways (two admissions, each with its own database engine, event-log client and balance view)
share one view source: the embedded Postgres log, whose ledger.balances holds the tenant's balance
as the processor would publish it. Postgres is DATABASE_URL, else an embedded server in a temp dir.

race (per mode):  the tenant has credit for `--balance-requests` requests of `--cost` each; `--requests`
                  requests (split evenly over the gateways) ask for it all at once. Every admitted request
                  then finishes at its full estimated cost (the worst case: max_tokens all used).
                  overspend = credits admitted beyond the balance; overspend_requests = that / cost.
near_empty (fast): the same race with credit for 1.5 requests (the "last credits" of a tenant).
expiring (per mode): the tenant's credit for `--balance-requests` requests is one block that expires
                  `--expiry-ms` after the race starts; requests arrive spread over twice that time and each
                  generates for `--generation-ms` after admission, so most finish after the block expired.
                  The admitted requests' usage is then folded by the real ledger (`ledger.tenant`) twice:
                  billed at admission (what the worker does: UsageRecorded.occurred_at = the gateway's
                  admitted_at_ms) and, for contrast, billed when generation finished (the old rule, under
                  which credit that expired mid-generation became overage). overspend = the fold's overage.
throughput:       `--throughput-requests` requests of a tenant with ample credit, `--concurrency` in
                  flight per gateway, each admitted then released; admits_per_s over both gateways.

Targets (issue 6): strict overspends 0; fast at most one request's maximum cost per gateway process.
Fast mode meets it with shares (`gateway_processes` = the number of gateways, see
gateway.admission.fast): each process holds at most its share of the balance, or one request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass

import msgspec

from gateway.admission.base import AdmissionRequest, CreditExhausted
from gateway.admission.fast import FastAdmission
from gateway.admission.metrics import AdmissionMetrics
from gateway.admission.settings import AdmissionSettings, TierLimits
from gateway.admission.strict import StrictAdmission
from gateway.ledger_view import LedgerView, LedgerViewFeed, wall_clock_ms
from ledger.events import CreditGranted, UsageRecorded
from ledger.tenant import TenantLedger
from storage.database import DatabaseSettings, build_async_engine, start_embedded_postgres, upgrade_database
from streams.embedded_log import PostgresLog
from streams.records import BalanceRecord
from streams.settings import StreamSettings

TIER = "bench"
VIEW_WAIT_S = 30
PROMPT_TOKENS = 100
MAX_TOKENS = 900


@dataclass
class Gateway:
    log: PostgresLog
    view: LedgerView
    feed: LedgerViewFeed
    admission: FastAdmission | StrictAdmission


def admission_settings(mode: str, gateways: int) -> AdmissionSettings:
    unlimited = TierLimits(requests_per_minute=10**9, tokens_per_minute=10**12)
    return AdmissionSettings(
        mode=mode,
        tiers={TIER: unlimited},
        tier_default=TIER,
        tenant_holds_max=10**6,
        view_ready_wait_ms=VIEW_WAIT_S * 1000,
        gateway_processes=gateways,
    )


async def start_gateways(engines, stream_settings: StreamSettings, mode: str) -> list[Gateway]:
    gateways = []
    for engine in engines:
        settings = admission_settings(mode, gateways=len(engines))
        log = PostgresLog(engine, stream_settings)
        await log.start()
        view = LedgerView(log.topics, log.partitions, metrics=AdmissionMetrics(registry=None))
        feed = LedgerViewFeed(log, view, settings)
        if mode == "strict":
            admission = StrictAdmission(view, settings, engine)
        else:
            admission = FastAdmission(view, settings)
        await feed.start()
        await admission.start()
        gateways.append(Gateway(log, view, feed, admission))
    return gateways


async def stop_gateways(gateways: list[Gateway]) -> None:
    for gateway in gateways:
        await gateway.admission.stop()
        await gateway.feed.stop()
        await gateway.log.stop()


async def give_balance(
    gateways: list[Gateway], tenant_id: str, balance: int, expires_at_ms: int | None = None
) -> None:
    """Publish the tenant's balance on ledger.balances and wait until every gateway's view has it.
    With `expires_at_ms`, the whole balance is one block expiring then (as the processor lists it)."""
    expiring = [(expires_at_ms, balance)] if expires_at_ms is not None else []
    record = BalanceRecord(
        tenant_id=tenant_id,
        balance=balance,
        overage=0,
        as_of=wall_clock_ms(),
        applied_offset=0,
        expiring=expiring,
    )
    log = gateways[0].log
    await log.append(log.topics.balances, tenant_id.encode(), msgspec.json.encode(record))
    async with asyncio.timeout(VIEW_WAIT_S):
        while any(g.view.balance(tenant_id) is None for g in gateways):
            await asyncio.sleep(0.01)


def request(tenant_id: str, request_id: str, cost: int) -> AdmissionRequest:
    return AdmissionRequest(
        request_id=request_id,
        tenant_id=tenant_id,
        tier=TIER,
        model="bench",
        prompt_tokens=PROMPT_TOKENS,
        max_tokens=MAX_TOKENS,
        estimated_cost=cost,
    )


async def race(gateways: list[Gateway], tenant_id: str, balance: int, requests: int, cost: int) -> dict:
    await give_balance(gateways, tenant_id, balance)

    async def attempt(number: int):
        admission = gateways[number % len(gateways)].admission
        try:
            reservation = await admission.admit(request(tenant_id, f"{tenant_id}-{number}", cost))
        except CreditExhausted:
            return 0
        await admission.finish(reservation, cost)  # worst case: every max token used
        return cost

    spent = sum(await asyncio.gather(*(attempt(n) for n in range(requests))))
    overspend = max(0, spent - balance)
    return {
        "balance": balance,
        "admitted": spent // cost,
        "spent": spent,
        "overspend": overspend,
        "overspend_requests": round(overspend / cost, 2),
    }


async def expiring_race(
    gateways: list[Gateway],
    tenant_id: str,
    balance: int,
    requests: int,
    cost: int,
    expiry_ms: int,
    generation_ms: int,
) -> dict:
    started_ms = wall_clock_ms()
    expires_at_ms = started_ms + expiry_ms
    await give_balance(gateways, tenant_id, balance, expires_at_ms)
    spread_s = 2 * expiry_ms / 1000 / requests
    admitted: list[tuple[int, int]] = []  # (admitted_at_ms, finished_at_ms) of each admitted request

    async def attempt(number: int) -> None:
        await asyncio.sleep(number * spread_s)
        admission = gateways[number % len(gateways)].admission
        try:
            reservation = await admission.admit(request(tenant_id, f"{tenant_id}-{number}", cost))
        except CreditExhausted:
            return
        admitted_at_ms = wall_clock_ms()
        await asyncio.sleep(generation_ms / 1000)
        await admission.finish(reservation, cost)  # worst case: every max token used
        admitted.append((admitted_at_ms, wall_clock_ms()))

    await asyncio.gather(*(attempt(n) for n in range(requests)))

    def overage_when_billed_at(moment: int) -> int:
        ledger = TenantLedger(tenant_id)
        ledger.apply(
            CreditGranted(
                event_id=f"{tenant_id}-grant",
                tenant_id=tenant_id,
                grant_id="g",
                amount=balance,
                effective_at=started_ms - 1_000,
                expires_at=expires_at_ms,
            )
        )
        for number, times in enumerate(admitted):
            ledger.apply(
                UsageRecorded(
                    event_id=f"{tenant_id}-usage-{number}",
                    tenant_id=tenant_id,
                    amount=cost,
                    occurred_at=times[moment],
                    model="bench",
                )
            )
        ledger.advance_to(max(expires_at_ms, *(finished for _, finished in admitted)) + 1)
        return ledger.overage_at(wall_clock_ms() + 10 * generation_ms)

    finished_after_expiry = sum(finished >= expires_at_ms for _, finished in admitted)
    return {
        "balance": balance,
        "admitted": len(admitted),
        "finished_after_expiry": finished_after_expiry,
        "overspend": overage_when_billed_at(0),
        "overspend_if_billed_at_finish": overage_when_billed_at(1),
    }


async def throughput(
    gateways: list[Gateway], tenant_id: str, requests: int, concurrency: int, cost: int
) -> float:
    await give_balance(gateways, tenant_id, 10**15)
    numbers = iter(range(requests))

    async def worker(gateway: Gateway) -> None:
        for number in numbers:
            reservation = await gateway.admission.admit(request(tenant_id, f"{tenant_id}-{number}", cost))
            await gateway.admission.release(reservation)

    started = time.perf_counter()
    await asyncio.gather(*(worker(g) for g in gateways for _ in range(concurrency)))
    return round(requests / (time.perf_counter() - started))


async def run(args: argparse.Namespace) -> dict:
    url = os.environ.get("DATABASE_URL")
    if not url:
        url = start_embedded_postgres(tempfile.mkdtemp(prefix="tollgate-bench-pg-"), delete_on_exit=True)
    await asyncio.to_thread(upgrade_database, url)
    database_settings = DatabaseSettings(
        database_url=url, pool_size_max=args.concurrency + 2, pool_overflow_max=0
    )
    engines = [build_async_engine(url, database_settings) for _ in range(args.gateways)]
    run_id = uuid.uuid4().hex[:8]
    stream_settings = StreamSettings(topic_prefix=f"bench.{run_id}.", topic_partitions=3)
    balance = args.balance_requests * args.cost
    result: dict = {
        "bench": "overspend",
        "gateways": args.gateways,
        "requests": args.requests,
        "request_cost_max": args.cost,
        "balance_requests": args.balance_requests,
    }
    try:
        for mode in ("fast", "strict"):
            gateways = await start_gateways(engines, stream_settings, mode)
            try:
                outcome = await race(gateways, f"{run_id}-{mode}-race", balance, args.requests, args.cost)
                if mode == "fast":
                    outcome["near_empty"] = await race(
                        gateways, f"{run_id}-{mode}-near-empty", args.cost * 3 // 2, args.requests, args.cost
                    )
                outcome["expiring"] = await expiring_race(
                    gateways,
                    f"{run_id}-{mode}-expiring",
                    balance,
                    args.expiring_requests,
                    args.cost,
                    args.expiry_ms,
                    args.generation_ms,
                )
                outcome["admits_per_s"] = await throughput(
                    gateways,
                    f"{run_id}-{mode}-throughput",
                    args.throughput_requests,
                    args.concurrency,
                    args.cost,
                )
                result[mode] = outcome
            finally:
                await stop_gateways(gateways)
    finally:
        for engine in engines:
            await engine.dispose()
    fast, strict = result["fast"], result["strict"]
    result["strict_overspend_zero"] = strict["overspend"] == 0 and strict["expiring"]["overspend"] == 0
    result["fast_within_one_request_per_gateway"] = all(
        race["overspend"] <= args.cost * args.gateways
        for race in (fast, fast["near_empty"], fast["expiring"])
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--balance-requests", type=int, default=10)
    parser.add_argument("--cost", type=int, default=1_000)
    parser.add_argument("--throughput-requests", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--expiring-requests", type=int, default=40)
    parser.add_argument("--expiry-ms", type=int, default=1_500)
    parser.add_argument("--generation-ms", type=int, default=1_500)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
