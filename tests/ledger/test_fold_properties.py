"""The fold against the brute-force oracle: random events, random arrival order, duplicates, with
queries and stream-time advances interleaved with arrivals."""

from __future__ import annotations

from collections import defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.entries import AllocationCorrected, CreditVoided, EndCorrected, UsageAllocated
from ledger.events import CreditExpired, CreditGranted, GrantVoided, UsageRecorded
from ledger.snapshot import account_from_bytes, account_to_bytes
from ledger.tenant import TenantLedger
from tests.ledger import oracle

TENANT = "tenant-a"
TIME_MAX = 200


@st.composite
def event_sets(draw):
    grant_count = draw(st.integers(0, 6))
    events = []
    for number in range(grant_count):
        effective_at = draw(st.integers(0, TIME_MAX // 2))
        expires_at = draw(st.one_of(st.none(), st.integers(effective_at + 1, effective_at + TIME_MAX // 2)))
        events.append(
            CreditGranted(
                event_id=f"grant-event-{number}",
                tenant_id=TENANT,
                grant_id=f"g{number}",
                amount=draw(st.integers(1, 20)),
                effective_at=effective_at,
                expires_at=expires_at,
                priority=draw(st.integers(0, 2)),
            )
        )
        for void_number in range(draw(st.integers(0, 2)) if draw(st.booleans()) else 0):
            events.append(
                GrantVoided(
                    event_id=f"void-event-{number}-{void_number}",
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
                model="m",
            )
        )
    duplicates = draw(st.lists(st.sampled_from(events), max_size=5)) if events else []
    arrivals = draw(st.permutations(events + duplicates))
    return arrivals


@st.composite
def scenarios(draw):
    arrivals = draw(event_sets())
    steps = []
    for event in arrivals:
        steps.append(("apply", event))
        if draw(st.integers(0, 3)) == 0:
            steps.append(("query", draw(st.integers(-1, TIME_MAX + 1))))
        if draw(st.integers(0, 6)) == 0:
            steps.append(("advance", draw(st.integers(0, TIME_MAX + 1))))
        if draw(st.integers(0, 8)) == 0:
            steps.append(("snapshot", None))
    steps.append(("query", draw(st.integers(-1, TIME_MAX + 1))))
    return steps


def check_query(ledger: TenantLedger, applied: list, t: int) -> None:
    assert ledger.balance_at(t) == oracle.balance_at(applied, t), f"balance at {t}"
    assert ledger.overage_at(t) == oracle.overage_at(applied, t), f"overage at {t}"
    blocks = {view.grant_id: view.remaining for view in ledger.blocks_at(t)}
    assert blocks == oracle.remaining_by_block_at(applied, t), f"blocks at {t}"
    totals = ledger.totals_at(t)
    assert tuple(totals) == oracle.totals_at(applied, t), f"totals at {t}"
    assert totals.granted == totals.consumed + totals.forfeited + totals.voided + totals.remaining


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_fold_matches_replay_oracle_in_any_order(steps):
    ledger = TenantLedger(TENANT)
    applied = []
    for action, value in steps:
        if action == "apply":
            ledger.apply(value)
            applied.append(value)
            ledger.account.check_invariants()
        elif action == "advance":
            ledger.advance_to(value)
        elif action == "snapshot":  # what a restarted processor does: the state from its bytes
            ledger.account = account_from_bytes(account_to_bytes(ledger.account))
        else:
            check_query(ledger, applied, value)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_published_entries_add_up_to_the_final_state(steps):  # noqa: C901  TODO(lead): split (issue 13's complexity bound)
    """Whatever the order, the entries published (allocations, corrections, forfeits) sum to the truth."""
    ledger = TenantLedger(TENANT)
    applied = []
    entries = []
    for action, value in steps:
        if action == "apply":
            entries += ledger.apply(value)
            applied.append(value)
        elif action == "advance":
            entries += ledger.advance_to(value)
        elif action == "snapshot":
            ledger.account = account_from_bytes(account_to_bytes(ledger.account))
    entries += ledger.advance_to(TIME_MAX * 3)
    ids = [entry.entry_id for entry in entries]
    assert len(ids) == len(set(ids)), "entry ids repeat"

    consumed = defaultdict(int)
    overage = 0
    ended = defaultdict(int)
    ended_kind = {}
    usage_total = 0
    for entry in entries:
        if isinstance(entry, UsageAllocated):
            assert sum(a.amount for a in entry.allocations) + entry.overage == entry.amount
            usage_total += entry.amount
            overage += entry.overage
            for allocation in entry.allocations:
                consumed[allocation.grant_id] += allocation.amount
        elif isinstance(entry, AllocationCorrected):
            overage += entry.overage_delta
            for allocation in entry.allocations:
                consumed[allocation.grant_id] += allocation.amount
        elif isinstance(entry, (CreditExpired, CreditVoided)):
            ended[entry.entry_id] += entry.amount
            ended_kind[entry.grant_id, type(entry).__name__] = entry.entry_id
        elif isinstance(entry, EndCorrected):
            ended[entry.corrects] += entry.delta

    blocks, true_overage = oracle.replay(applied, TIME_MAX * 3)
    assert overage == true_overage
    distinct = oracle.distinct_events(applied)
    assert usage_total == sum(e.amount for e in distinct if isinstance(e, UsageRecorded))
    for block in blocks.values():
        assert consumed[block.grant_id] == block.consumed, block.grant_id
        kind = "CreditVoided" if block.voided else "CreditExpired"
        if block.end != oracle.FOREVER:
            entry_id = ended_kind[block.grant_id, kind]
            assert ended[entry_id] == block.amount - block.consumed, block.grant_id
            other = ended_kind.get((block.grant_id, "CreditExpired" if block.voided else "CreditVoided"))
            if other is not None:
                assert ended[other] == 0, f"{block.grant_id}: the superseded end was not corrected to zero"
