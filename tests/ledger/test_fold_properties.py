"""The fold against the brute-force oracle: random events, random arrival order, duplicates, with
queries and stream-time advances interleaved with arrivals."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

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


def run_publishing(steps) -> tuple[list, list]:
    """Play the steps (queries skipped) and advance past every expiry: the events applied and every entry
    published, in order."""
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
    return applied, entries


@dataclass
class EntryTotals:
    """The published entries summed: consumed per grant, overage, usage, and each end entry's amount after
    its corrections (ends: (grant id, kind) -> the end's entry id)."""

    consumed: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    overage: int = 0
    usage_total: int = 0
    ended: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    ends: dict[tuple[str, str], str] = field(default_factory=dict)


def sum_entries(entries: list) -> EntryTotals:
    totals = EntryTotals()
    for entry in entries:
        if isinstance(entry, UsageAllocated):
            assert sum(a.amount for a in entry.allocations) + entry.overage == entry.amount, entry.entry_id
            totals.usage_total += entry.amount
            totals.overage += entry.overage
            add_allocations(totals, entry.allocations)
        elif isinstance(entry, AllocationCorrected):
            totals.overage += entry.overage_delta
            add_allocations(totals, entry.allocations)
        elif isinstance(entry, (CreditExpired, CreditVoided)):
            totals.ended[entry.entry_id] += entry.amount
            totals.ends[entry.grant_id, type(entry).__name__] = entry.entry_id
        elif isinstance(entry, EndCorrected):
            totals.ended[entry.corrects] += entry.delta
    return totals


def add_allocations(totals: EntryTotals, allocations) -> None:
    for allocation in allocations:
        totals.consumed[allocation.grant_id] += allocation.amount


def check_block_against_entries(block, totals: EntryTotals) -> None:
    """A grant's consumption, and its end (expiry or void) net of corrections, as the oracle says; the end
    it superseded corrected to zero."""
    assert totals.consumed[block.grant_id] == block.consumed, block.grant_id
    if block.end == oracle.FOREVER:
        return
    kind, other_kind = (
        ("CreditVoided", "CreditExpired") if block.voided else ("CreditExpired", "CreditVoided")
    )
    entry_id = totals.ends[block.grant_id, kind]
    assert totals.ended[entry_id] == block.amount - block.consumed, block.grant_id
    other = totals.ends.get((block.grant_id, other_kind))
    if other is not None:
        assert totals.ended[other] == 0, f"{block.grant_id}: the superseded end was not corrected to zero"


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_published_entries_add_up_to_the_final_state(steps):
    """Whatever the order, the entries published (allocations, corrections, forfeits) sum to the truth."""
    applied, entries = run_publishing(steps)
    ids = [entry.entry_id for entry in entries]
    assert len(ids) == len(set(ids)), "entry ids repeat"
    totals = sum_entries(entries)

    blocks, true_overage = oracle.replay(applied, TIME_MAX * 3)
    assert totals.overage == true_overage
    distinct = oracle.distinct_events(applied)
    assert totals.usage_total == sum(e.amount for e in distinct if isinstance(e, UsageRecorded))
    for block in blocks.values():
        check_block_against_entries(block, totals)
