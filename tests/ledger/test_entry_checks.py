"""The money checks on entries (ledger.entries): what the fold asserts where usage is allocated, and the
projector checks again after reading. Each fires on an entry that does not add up, and only then."""

from __future__ import annotations

import pytest

from ledger.entries import (
    Allocation,
    AllocationCorrected,
    UsageAllocated,
    check_allocation_corrected,
    check_usage_allocated,
)


def usage(amount: int, allocations: tuple[tuple[str, int], ...], overage: int) -> UsageAllocated:
    return UsageAllocated(
        entry_id="t/usage/r",
        tenant_id="t",
        event_id="r",
        occurred_at=1,
        model="m",
        prompt_tokens=1,
        completion_tokens=1,
        amount=amount,
        allocations=tuple(Allocation(*a) for a in allocations),
        overage=overage,
    )


def correction(deltas: tuple[tuple[str, int], ...], overage_delta: int) -> AllocationCorrected:
    return AllocationCorrected(
        entry_id="t/corrected/r",
        tenant_id="t",
        cause_event_id="c",
        allocations=tuple(Allocation(*d) for d in deltas),
        overage_delta=overage_delta,
    )


def test_usage_that_adds_up_passes():
    check_usage_allocated(usage(10, (("g1", 6), ("g2", 3)), overage=1))
    check_usage_allocated(usage(0, (), overage=0))


@pytest.mark.parametrize(
    ("amount", "allocations", "overage"),
    [(10, (("g1", 6),), 1), (10, (("g1", 11),), 0), (-1, (), -1), (5, (), 6)],
    ids=["short", "over", "negative", "overage-too-large"],
)
def test_usage_that_does_not_add_up_fails(amount, allocations, overage):
    with pytest.raises(AssertionError):
        check_usage_allocated(usage(amount, allocations, overage))


def test_a_correction_moves_money_and_never_creates_it():
    check_allocation_corrected(correction((("g1", -4), ("g2", 4)), overage_delta=0))
    check_allocation_corrected(correction((("g1", 3),), overage_delta=-3))
    with pytest.raises(AssertionError):
        check_allocation_corrected(correction((("g1", 3),), overage_delta=0))
