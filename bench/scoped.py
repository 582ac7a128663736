"""Credits scoped to models, the fold's cost: `python -m bench.scoped` prints one JSON line.

One tenant with the grants of bench.ledger (100, overlapping in time), a quarter of them scoped to model
m1 and a quarter to m1 and m2; usage of m1, m2 and m3 in turn. The same stream folded for a tenant whose
grants are all unscoped gives the baseline, in the same process.

- unscoped_usage_events_per_s / scoped_usage_events_per_s: usage folded in time order
- scoped_late_10pct_usage_events_per_s: with 10% of the usage late (as bench.ledger)
- scoped_state_bytes_after_10k / _after_200k: a scoped tenant's state keeps its usage by model per segment
  (ledger.scoped; the usage by millisecond lives in the usage index), so it stays O(segments x models)
- scoped_grants_after_usage_ms: the scoped grants arriving after all the usage they are backdated over
  (the first one builds the usage by model from the index); the result equals the in-order fold's
"""

from __future__ import annotations

import json
import time

import msgspec

from bench.ledger import GRANTS, TENANT, grants, usages, with_late_arrivals
from ledger.events import CreditGranted, UsageRecorded
from ledger.snapshot import account_to_bytes
from ledger.tenant import TenantLedger

USAGE_EVENTS = 200_000
MODELS = ("m1", "m2", "m3")
SCOPES = ((), (), ("m1",), ("m1", "m2"))  # by grant number modulo 4


def scoped_grants() -> list[CreditGranted]:
    return [msgspec.structs.replace(g, models=SCOPES[n % len(SCOPES)]) for n, g in enumerate(grants())]


def usage_of_models(count: int) -> list[UsageRecorded]:
    return [msgspec.structs.replace(u, model=MODELS[n % len(MODELS)]) for n, u in enumerate(usages(count))]


def fold_rate(grant_events: list[CreditGranted], stream: list[UsageRecorded]) -> tuple[float, TenantLedger]:
    ledger = TenantLedger(TENANT)
    for grant in grant_events:
        ledger.apply(grant)
    apply = ledger.apply
    started = time.perf_counter()
    for event in stream:
        apply(event)
    elapsed = time.perf_counter() - started
    ledger.account.check_invariants()
    return len(stream) / elapsed, ledger


def scoped_grants_after_usage(stream: list[UsageRecorded]) -> tuple[float, TenantLedger]:
    """The unscoped grants, all the usage, then the scoped grants (backdated over it): ms to fold those."""
    all_grants = scoped_grants()
    ledger = TenantLedger(TENANT)
    for grant in [g for g in all_grants if not g.models] + stream:
        ledger.apply(grant)
    assert not ledger.account.has_scopes
    started = time.perf_counter()
    for grant in [g for g in all_grants if g.models]:
        ledger.apply(grant)
    elapsed_ms = (time.perf_counter() - started) * 1000
    ledger.account.check_invariants()
    return elapsed_ms, ledger


def main() -> None:
    stream = usage_of_models(USAGE_EVENTS)
    unscoped_rate, _ = fold_rate(grants(), stream)
    scoped_rate, scoped = fold_rate(scoped_grants(), stream)
    late_rate, late = fold_rate(scoped_grants(), with_late_arrivals(stream, 0.10, 5_000))
    assert late.balance_at(10**15) == scoped.balance_at(10**15), "late arrival changed the result"
    assert scoped.account.has_scopes
    _, small = fold_rate(scoped_grants(), usage_of_models(10_000))
    late_grants_ms, after = scoped_grants_after_usage(stream)
    assert after.balance_at(10**15) == scoped.balance_at(10**15), "late scoped grants changed the result"
    assert after.blocks_at(10**15) == scoped.blocks_at(10**15), "late scoped grants changed the blocks"
    print(
        json.dumps(
            {
                "benchmark": "scoped",
                "grants": GRANTS,
                "scoped_grants": sum(1 for g in scoped_grants() if g.models),
                "usage_events": USAGE_EVENTS,
                "unscoped_usage_events_per_s": round(unscoped_rate),
                "scoped_usage_events_per_s": round(scoped_rate),
                "scoped_late_10pct_usage_events_per_s": round(late_rate),
                "scoped_slowdown": round(unscoped_rate / scoped_rate, 2),
                "scoped_state_bytes_after_10k": len(account_to_bytes(small.account)),
                "scoped_state_bytes_after_200k": len(account_to_bytes(scoped.account)),
                "scoped_grants_after_usage_ms": round(late_grants_ms, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
