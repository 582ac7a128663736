"""Credits scoped to models (ledger.scoped) against the brute-force oracle and across arrival orders:
random grants scoped to models, voids, usage of several models, duplicates, queries, snapshots and
stream-time advances interleaved with arrivals, in any arrival order: usage may come before the tenant's
first scoped grant (which may be backdated over it), and is then attributed to its models from the usage
index."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.events import CreditGranted, GrantVoided, UsageRecorded
from ledger.snapshot import account_from_bytes, account_to_bytes
from ledger.tenant import TenantLedger
from tests.ledger import oracle
from tests.ledger.test_fold_properties import (
    TENANT,
    TIME_MAX,
    check_block_against_entries,
    check_query,
    run_publishing,
    sum_entries,
)

MODELS = ("a", "b", "c", "d")  # "d" is named by no scope
# Any two nested or disjoint: every scope's leftover flows into one place, as drawing one event at a time.
NESTED_SCOPES = (("a",), ("b",), ("a", "b"), ("c",), ("b", "a", "c"))
# {a, b} and {b, c} cross: inside a segment the order of models is the fold's (name order).
CROSSING_SCOPES = (("a", "b"), ("b", "c"), ("c",))


@st.composite
def scoped_event_sets(draw, scopes):
    grant_count = draw(st.integers(1, 6))
    events = []
    for number in range(grant_count):
        effective_at = draw(st.integers(0, TIME_MAX // 2))
        expires_at = draw(st.one_of(st.none(), st.integers(effective_at + 1, effective_at + TIME_MAX // 2)))
        models = draw(st.one_of(st.just(()), st.sampled_from(scopes)))
        grant = CreditGranted(
            event_id=f"grant-event-{number}",
            tenant_id=TENANT,
            grant_id=f"g{number}",
            amount=draw(st.integers(1, 20)),
            effective_at=effective_at,
            expires_at=expires_at,
            priority=draw(st.integers(0, 2)),
            models=models,
        )
        events.append(grant)
        if draw(st.integers(0, 3)) == 0:
            events.append(
                GrantVoided(
                    event_id=f"void-event-{number}",
                    tenant_id=TENANT,
                    grant_id=f"g{number}",
                    voided_at=draw(st.integers(0, TIME_MAX)),
                )
            )
    for number in range(draw(st.integers(0, 25))):
        events.append(
            UsageRecorded(
                event_id=f"usage-{number}",
                tenant_id=TENANT,
                amount=draw(st.integers(0, 15)),
                occurred_at=draw(st.integers(0, TIME_MAX)),
                model=draw(st.sampled_from(MODELS)),
            )
        )
    duplicates = draw(st.lists(st.sampled_from(events), max_size=5))
    return draw(st.permutations(events + duplicates))


@st.composite
def scoped_scenarios(draw, scopes=NESTED_SCOPES):
    steps = []
    for event in draw(scoped_event_sets(scopes)):
        steps.append(("apply", event))
        if draw(st.integers(0, 3)) == 0:
            steps.append(("query", draw(st.integers(-1, TIME_MAX + 1))))
        if draw(st.integers(0, 6)) == 0:
            steps.append(("advance", draw(st.integers(0, TIME_MAX + 1))))
        if draw(st.integers(0, 8)) == 0:
            steps.append(("snapshot", None))
    steps.append(("query", draw(st.integers(-1, TIME_MAX + 1))))
    return steps


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scoped_scenarios())
def test_scoped_fold_matches_replay_oracle_in_any_order(steps):
    ledger = TenantLedger(TENANT)
    applied = []
    for action, value in steps:
        if action == "apply":
            ledger.apply(value)
            applied.append(value)
            ledger.account.check_invariants(ledger.index)
        elif action == "advance":
            ledger.advance_to(value)
        elif action == "snapshot":
            ledger.account = account_from_bytes(account_to_bytes(ledger.account))
        else:
            check_query(ledger, applied, value)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scoped_scenarios())
def test_scoped_entries_add_up_to_the_oracle(steps):
    """Whatever the order, the entries published sum to the oracle's truth, block by block (scoped blocks
    included), and every usage entry's allocations plus overage equal its amount."""
    applied, entries = run_publishing(steps)
    ids = [entry.entry_id for entry in entries]
    assert len(ids) == len(set(ids)), "entry ids repeat"
    totals = sum_entries(entries)
    blocks, true_overage = oracle.replay(applied, TIME_MAX * 3)
    assert totals.overage == true_overage
    for block in blocks.values():
        check_block_against_entries(block, totals)


def final_view(steps) -> tuple:
    """What a fold of the steps' events ends with: queries at every time, and the entries' net effect."""
    applied, entries = run_publishing(steps)
    ledger = TenantLedger(TENANT)
    for event in applied:
        ledger.apply(event)
    ledger.account.check_invariants(ledger.index)
    totals = sum_entries(entries)
    queries = [
        (ledger.balance_at(t), tuple(ledger.totals_at(t)), tuple(ledger.blocks_at(t)))
        for t in range(-1, TIME_MAX + 2, 7)
    ]
    consumed = {grant_id: amount for grant_id, amount in totals.consumed.items() if amount}
    ended = {entry_id: amount for entry_id, amount in totals.ended.items() if amount}
    return queries, consumed, totals.overage, ended


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_crossing_scopes_are_order_independent(data):
    """Scopes that cross ({a, b} and {b, c}) have no per-event oracle (the order of models inside a
    segment is the fold's), but any arrival order of the same events folds to the same balances,
    blocks, totals and net entries."""
    steps = data.draw(scoped_scenarios(CROSSING_SCOPES))
    events = [value for action, value in steps if action == "apply"]
    other = [("apply", event) for event in data.draw(st.permutations(events))]
    assert final_view(steps) == final_view(other)
