"""Ledger fold benchmark: `python -m bench.ledger` prints one JSON line.

- in_order_usage_events_per_s: usage events folded in time order (one tenant, 100 grants)
- late_10pct_usage_events_per_s: the same stream with 10% of usage events delivered late (held back
  by a random delay of up to `late_delay_events_max` positions, so some cross segment boundaries)
- state_bytes_after_10k / _after_1m: the serialized account state of one tenant with 100 grants
- late_slowdown: in-order rate / late rate (target <= 3); state_growth: 1M / 10k (target <= 1.2)
"""

from __future__ import annotations

import json
import random
import time

from ledger.events import CreditGranted, UsageRecorded
from ledger.snapshot import account_to_bytes
from ledger.tenant import TenantLedger

TENANT = "bench-tenant"
GRANTS = 100
GRANT_SPACING_MS = 60_000
GRANT_LIFETIME_MS = 3_600_000
SEED = 7


def grants() -> list[CreditGranted]:
    return [
        CreditGranted(
            event_id=f"grant-event-{n}",
            tenant_id=TENANT,
            grant_id=f"grant-{n}",
            amount=10**12,
            effective_at=n * GRANT_SPACING_MS,
            expires_at=n * GRANT_SPACING_MS + GRANT_LIFETIME_MS,
            priority=n % 3,
        )
        for n in range(GRANTS)
    ]


def usages(count: int) -> list[UsageRecorded]:
    span_ms = GRANTS * GRANT_SPACING_MS + GRANT_LIFETIME_MS
    step = max(1, span_ms // count)
    return [
        UsageRecorded(
            event_id=f"req-{n}", tenant_id=TENANT, amount=1 + n % 97, occurred_at=n * step, model="m"
        )
        for n in range(count)
    ]


def with_late_arrivals(events: list[UsageRecorded], fraction: float, delay_max: int) -> list[UsageRecorded]:
    rng = random.Random(SEED)
    delayed: list[tuple[int, int, UsageRecorded]] = []
    out: list[UsageRecorded] = []
    for position, event in enumerate(events):
        if rng.random() < fraction:
            delayed.append((position + rng.randint(1, delay_max), position, event))
        else:
            out.append(event)
    delayed.sort()
    merged: list[UsageRecorded] = []
    pending = iter(delayed)
    nxt = next(pending, None)
    for position, event in enumerate(out):
        while nxt is not None and nxt[0] <= position:
            merged.append(nxt[2])
            nxt = next(pending, None)
        merged.append(event)
    while nxt is not None:
        merged.append(nxt[2])
        nxt = next(pending, None)
    assert len(merged) == len(events)
    return merged


def fold_rate(stream: list[UsageRecorded]) -> tuple[float, TenantLedger]:
    ledger = TenantLedger(TENANT)
    for grant in grants():
        ledger.apply(grant)
    apply = ledger.apply
    started = time.perf_counter()
    for event in stream:
        apply(event)
    elapsed = time.perf_counter() - started
    ledger.account.check_invariants()
    return len(stream) / elapsed, ledger


def main() -> None:
    count = 1_000_000
    stream = usages(count)
    in_order_rate, ledger_1m = fold_rate(stream)
    late_delay_events_max = 5_000
    late_rate, late_ledger = fold_rate(with_late_arrivals(stream, 0.10, late_delay_events_max))
    assert late_ledger.balance_at(10**15) == ledger_1m.balance_at(10**15), "late arrival changed the result"
    _, ledger_10k = fold_rate(usages(10_000))
    bytes_10k = len(account_to_bytes(ledger_10k.account))
    bytes_1m = len(account_to_bytes(ledger_1m.account))
    print(
        json.dumps(
            {
                "benchmark": "ledger",
                "grants": GRANTS,
                "usage_events": count,
                "in_order_usage_events_per_s": round(in_order_rate),
                "late_10pct_usage_events_per_s": round(late_rate),
                "late_delay_events_max": late_delay_events_max,
                "late_slowdown": round(in_order_rate / late_rate, 2),
                "state_bytes_after_10k": bytes_10k,
                "state_bytes_after_1m": bytes_1m,
                "state_growth": round(bytes_1m / bytes_10k, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
