"""One test per ledger rule, boundaries included."""

from __future__ import annotations

import copy

import pytest

from ledger.account import ConflictingEvent
from ledger.entries import AllocationCorrected, CreditVoided, EndCorrected, UsageAllocated
from ledger.events import CreditExpired, CreditGranted, GrantVoided, InvalidEvent, UsageRecorded
from ledger.snapshot import account_from_bytes, account_to_bytes
from ledger.tenant import TenantLedger
from tests.ledger import oracle

T = "tenant"


def grant(grant_id, amount, effective_at, expires_at=None, priority=0):
    return CreditGranted(
        event_id=f"g-{grant_id}",
        tenant_id=T,
        grant_id=grant_id,
        amount=amount,
        effective_at=effective_at,
        expires_at=expires_at,
        priority=priority,
    )


def usage(event_id, amount, occurred_at):
    return UsageRecorded(
        event_id=event_id,
        tenant_id=T,
        amount=amount,
        occurred_at=occurred_at,
        model="m",
        prompt_tokens=3,
        completion_tokens=4,
    )


def void(grant_id, voided_at, event_id=None):
    return GrantVoided(
        event_id=event_id or f"v-{grant_id}-{voided_at}", tenant_id=T, grant_id=grant_id, voided_at=voided_at
    )


def ledger_of(*events):
    ledger = TenantLedger(T)
    for event in events:
        ledger.apply(event)
    return ledger


def test_block_counts_from_effective_at_inclusive_to_expiry_exclusive():
    ledger = ledger_of(grant("a", 5, 10, 20))
    assert [ledger.balance_at(t) for t in (9, 10, 19, 20)] == [0, 5, 5, 0]


def test_usage_at_the_expiry_instant_cannot_draw_from_the_block():
    ledger = ledger_of(grant("a", 5, 10, 20), usage("u", 3, 20))
    assert ledger.overage_at(20) == 3
    assert ledger.totals_at(20).forfeited == 5


def test_usage_at_the_effective_instant_draws_from_the_block():
    ledger = ledger_of(usage("u", 3, 10), grant("a", 5, 10, 20))
    assert ledger.balance_at(10) == 2
    assert ledger.overage_at(10) == 0


def test_soonest_expiry_is_drawn_first_then_effective_at_then_grant_id():
    ledger = ledger_of(
        grant("late", 5, 0, 100), grant("soon", 5, 0, 50), grant("never", 5, 0), usage("u", 7, 1)
    )
    remaining = {b.grant_id: b.remaining for b in ledger.blocks_at(1)}
    assert remaining == {"soon": 0, "late": 3, "never": 5}
    tie = ledger_of(grant("b", 5, 0, 50), grant("a", 5, 0, 50), usage("u", 6, 1))
    assert {b.grant_id: b.remaining for b in tie.blocks_at(1)} == {"a": 0, "b": 4}


def test_priority_comes_before_expiry():
    ledger = ledger_of(
        grant("cheap", 5, 0, 100, priority=0), grant("soon", 5, 0, 10, priority=1), usage("u", 6, 1)
    )
    assert {b.grant_id: b.remaining for b in ledger.blocks_at(1)} == {"cheap": 0, "soon": 4}


def test_shortfall_is_overage_and_balance_never_negative():
    ledger = ledger_of(grant("a", 5, 0), usage("u", 8, 1))
    assert ledger.balance_at(1) == 0
    assert ledger.overage_at(1) == 3
    assert ledger.overage_at(0) == 0


def test_expiry_forfeits_the_remainder_and_conservation_holds():
    ledger = ledger_of(grant("a", 10, 0, 50), usage("u", 4, 10))
    totals = ledger.totals_at(50)
    assert (totals.granted, totals.consumed, totals.forfeited, totals.remaining) == (10, 4, 6, 0)
    assert totals.granted == totals.consumed + totals.forfeited + totals.voided + totals.remaining


def test_void_removes_the_remainder_from_its_time_on():
    ledger = ledger_of(grant("a", 10, 0, 100), usage("u1", 3, 10), void("a", 40), usage("u2", 2, 40))
    assert ledger.balance_at(39) == 7
    assert ledger.balance_at(40) == 0
    assert ledger.overage_at(40) == 2, "usage at the void instant comes after the void"
    assert ledger.totals_at(40).voided == 7


def test_void_before_its_grant_arrives_still_applies():
    ledger = ledger_of(void("a", 40), grant("a", 10, 0, 100))
    assert ledger.balance_at(39) == 10
    assert ledger.balance_at(40) == 0


def test_earliest_of_two_voids_wins_in_either_order():
    one = ledger_of(grant("a", 10, 0), void("a", 50), void("a", 30))
    two = ledger_of(grant("a", 10, 0), void("a", 30), void("a", 50))
    assert one.balance_at(35) == two.balance_at(35) == 0
    assert one.balance_at(29) == two.balance_at(29) == 10


def test_void_at_the_expiry_instant_is_an_expiry():
    ledger = ledger_of(grant("a", 10, 0, 50), void("a", 50))
    totals = ledger.totals_at(50)
    assert (totals.forfeited, totals.voided) == (10, 0)


def test_void_before_effective_means_the_block_never_counts():
    ledger = ledger_of(grant("a", 10, 20, 50), void("a", 10))
    assert ledger.balance_at(25) == 0
    assert ledger.totals_at(25).voided == 10


def test_duplicate_usage_changes_nothing():
    ledger = ledger_of(grant("a", 10, 0))
    assert ledger.apply(usage("u", 4, 5))
    assert ledger.apply(usage("u", 4, 5)) == []
    assert ledger.balance_at(5) == 6


def test_duplicate_grant_changes_nothing_and_a_conflicting_one_is_rejected():
    ledger = ledger_of(grant("a", 10, 0))
    assert ledger.apply(grant("a", 10, 0)) == []
    with pytest.raises(ConflictingEvent, match="grant_id 'a'"):
        ledger.apply(grant("a", 11, 0))
    assert ledger.balance_at(0) == 10


def test_point_in_time_between_two_usages_of_one_segment():
    ledger = ledger_of(grant("a", 10, 0, 100), usage("u1", 1, 10), usage("u2", 2, 20), usage("u3", 3, 30))
    assert [ledger.balance_at(t) for t in (9, 10, 15, 20, 25, 30)] == [10, 9, 9, 7, 7, 4]


def test_late_grant_splitting_a_segment_with_usage_on_both_sides():
    ledger = ledger_of(usage("u1", 4, 10), usage("u2", 4, 30), grant("a", 5, 0))
    entries = ledger.apply(grant("b", 10, 20, 40))
    assert ledger.balance_at(30) == 1 + 6
    correction = [e for e in entries if isinstance(e, AllocationCorrected)]
    assert correction and {a.grant_id: a.amount for a in correction[0].allocations} == {"a": -1, "b": 4}
    assert correction[0].overage_delta == -3


def test_usage_entry_names_the_blocks_that_paid_and_the_overage():
    ledger = ledger_of(grant("a", 3, 0, 10), grant("b", 3, 0, 20))
    [entry] = ledger.apply(usage("req-1", 8, 5))
    assert isinstance(entry, UsageAllocated)
    assert [(a.grant_id, a.amount) for a in entry.allocations] == [("a", 3), ("b", 3)]
    assert entry.overage == 2
    assert (entry.event_id, entry.prompt_tokens, entry.completion_tokens) == ("req-1", 3, 4)


def test_expiry_is_published_when_stream_time_passes_it_and_corrected_by_late_usage():
    ledger = ledger_of(grant("a", 10, 0, 50), usage("u1", 4, 10))
    assert ledger.advance_to(49) == []
    [expired] = ledger.advance_to(50)
    assert isinstance(expired, CreditExpired) and expired.amount == 6
    assert ledger.advance_to(60) == [], "published once"
    late = ledger.apply(usage("u0", 2, 5))
    correction = [e for e in late if isinstance(e, EndCorrected)]
    assert len(correction) == 1
    assert (correction[0].corrects, correction[0].delta) == (expired.entry_id, -2)


def test_late_void_turns_a_published_expiry_into_a_void():
    ledger = ledger_of(grant("a", 10, 0, 50))
    ledger.advance_to(100)
    entries = ledger.apply(void("a", 20))
    kinds = [type(e) for e in entries]
    assert EndCorrected in kinds and CreditVoided in kinds
    [voided] = [e for e in entries if isinstance(e, CreditVoided)]
    assert voided.amount == 10


def test_statement_over_a_window():
    ledger = ledger_of(grant("a", 10, 0, 50), grant("b", 5, 20), usage("u1", 3, 10), usage("u2", 4, 30))
    statement = ledger.statement(15, 60)
    assert statement.opening_balance == 7
    assert (statement.granted, statement.consumed, statement.forfeited) == (5, 4, 3)
    assert statement.closing_balance == 5


def test_derived_events_are_not_accepted_as_input():
    ledger = TenantLedger(T)
    with pytest.raises(InvalidEvent, match="derived"):
        ledger.apply(CreditExpired(event_id="x", tenant_id=T, grant_id="a", expired_at=1, amount=1))


def test_snapshot_round_trip_continues_the_same_fold():
    events = [grant("a", 10, 0, 50), grant("b", 5, 20), usage("u1", 3, 10), usage("u2", 4, 30)]
    ledger = ledger_of(*events)
    ledger.advance_to(55)
    restored = TenantLedger(T)
    restored.account = account_from_bytes(account_to_bytes(ledger.account))
    restored.index = copy.deepcopy(ledger.index)
    for target in (ledger, restored):
        target.apply(usage("u3", 2, 40))
    for t in (0, 10, 25, 40, 55):
        assert restored.balance_at(t) == ledger.balance_at(t)
    assert restored.account.watermark == 55


def test_zero_amount_usage_keeps_segment_times_right_through_later_splits():
    """Found by hypothesis: a split once gave a zero-total segment the times of usage beyond its bound,
    and a later split then asked the index about an empty range."""
    events = [usage("zero", 0, 2), grant("a", 1, 2), usage("one", 1, 0), grant("b", 1, 0), void("a", 1)]
    ledger = ledger_of(*events)
    ledger.account.check_invariants()
    restored = account_from_bytes(account_to_bytes(ledger.account))
    for t in (-1, 0, 1, 2, 3):
        assert ledger.balance_at(t) == oracle.balance_at(events, t)
        assert restored.balance_at(t, ledger.index) == oracle.balance_at(events, t)


def test_a_grant_that_would_take_the_tenants_total_above_the_bound_is_refused():
    from ledger.events import TENANT_CREDIT_MAX

    half = TENANT_CREDIT_MAX // 2
    ledger = ledger_of(grant("a", half, 0), grant("b", half, 5, expires_at=6))  # expired: still counts
    with pytest.raises(InvalidEvent, match="^amount: .*TENANT_CREDIT_MAX"):
        ledger.apply(grant("c", 1, 10))
    assert ledger.balance_at(10) == half and ledger.totals_at(10).granted == 2 * half
    restored = account_from_bytes(account_to_bytes(ledger.account))
    assert restored.granted_total == TENANT_CREDIT_MAX
    with pytest.raises(InvalidEvent, match="^amount: "):
        restored.apply(grant("c", 1, 10), ledger.index)
    assert ledger.apply(grant("a", half, 0)) == []  # a duplicate of an applied grant is still a duplicate
