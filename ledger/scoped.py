"""Credits scoped to models: the part of a tenant's fold that exists only once one of its grants names
models (`CreditGranted.models`). A tenant without a scoped grant has none of it (`Account._scopes` is
None) and pays nothing for it.

The rules (see the README's "Credits scoped to models"):
- A scoped grant's block pays only for usage of the models it names; an unscoped block pays for any.
- Usage of model M draws, among the blocks active at its time, first the scoped blocks whose models
  include M, smallest scope first (fewest models, then the sorted model names), each scope's blocks in
  the usual order (priority, expires_at soonest, effective_at, grant_id); then the unscoped blocks in the
  usual order; what none covers is overage.
- When scopes are nested or disjoint (one model, or a family in which any two scopes are nested or
  disjoint: the usual case), every scope's leftover flows into one next scope or into the unscoped blocks,
  a tree: the result does not depend on the order of usage inside a segment, and equals drawing usage one
  event at a time in time order. When two scopes overlap without one containing the other (the crossing
  case), the order matters; inside a segment (an interval where the set of active blocks does not change)
  the models are then served in name order. Either way the fold is order-independent: the same events in
  any arrival order give the same result.

The account's segments stay as they are (bounds, usage total, allocations, overage per segment). A scoped
tenant's account also keeps, per segment, its usage by model: O(segments x models), not O(usage). A
segment is allocated from these sums, so a usage at the frontier costs O(active blocks), and a late event
recomputes the segments from its own on, as for any tenant. When to split a segment whose usage lies on
both sides of a late bound, or to answer a query inside a segment, the account asks the usage index beside
it (`UsageIndex.usage_by_model_between`), which keeps every usage's model, as it asks it for totals.

The per-segment sums are built from the index at the tenant's first scoped grant, whenever it arrives:
usage folded before it is attributed to its models then, so a first scoped grant that arrives late and is
backdated over usage already folded takes that usage as it would have in time order. Every arrival order
of the same events gives the same result.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import msgspec

from ledger.usage_index import UsageIndex


class ScopedBlock(Protocol):
    grant_id: str
    amount: int
    models: tuple[str, ...]

    @property
    def order_key(self) -> tuple[int, int, int, str]: ...


class ScopesState(msgspec.Struct, frozen=True):
    """The scoped part of `ledger.snapshot.AccountState` (None in the state of a tenant without it)."""

    segment_model_usage: list[dict[str, int]]  # per segment: usage by model


def scope_key(models: tuple[str, ...]) -> tuple[int, tuple[str, ...]]:
    """The order in which a usage tries the scopes that name its model: smallest scope first."""
    return (len(models), tuple(sorted(models)))


def scoped_order(active: Sequence[ScopedBlock]) -> list[ScopedBlock]:
    """The scoped blocks among `active`, in the order a usage tries them (smallest scope first)."""
    scoped = [block for block in active if block.models]
    return sorted(scoped, key=lambda b: (scope_key(b.models), b.order_key))


def allocate_segment(
    active: Sequence[ScopedBlock],
    scoped: Sequence[ScopedBlock],
    remaining: dict[str, int],
    model_usage: dict[str, int],
    total: int,
) -> tuple[dict[str, int], int]:
    """Greedy consumption of one segment. `active`: the blocks active in it, in the usual order; `scoped`:
    `scoped_order(active)`; `remaining`: each one's credit left before the segment; `model_usage`: the
    segment's usage by model (it may be less than `total`: usage of no model). Returns (what each block
    gives, > 0; the overage)."""
    takes: dict[str, int] = {}
    leftover = total
    if scoped:
        for model in sorted(model_usage):
            need = model_usage[model]
            leftover -= need
            for block in scoped:
                if not need:
                    break
                if model not in block.models:
                    continue
                need = _take(block.grant_id, remaining, takes, need)
            leftover += need
    assert leftover >= 0, f"usage by model exceeds the segment's usage by {-leftover}"
    for block in active:
        if not leftover:
            break
        if not block.models:
            leftover = _take(block.grant_id, remaining, takes, leftover)
    return takes, leftover


def _take(grant_id: str, remaining: dict[str, int], takes: dict[str, int], need: int) -> int:
    left = remaining[grant_id] - takes.get(grant_id, 0)
    take = left if left < need else need
    if take > 0:
        takes[grant_id] = takes.get(grant_id, 0) + take
        return need - take
    return need


class CreditBlockView(Protocol):
    remaining: int
    expires_at: int | None
    models: tuple[str, ...]


def scoped_credit(blocks: Iterable[CreditBlockView]) -> tuple[tuple[tuple[str, ...], int | None, int], ...]:
    """(models, expires_at, remaining) of the scoped blocks with credit left, summed per scope and expiry,
    sorted: what a balance record tells admission about the credit only some models may spend."""
    sums: dict[tuple[tuple[str, ...], int | None], int] = {}
    for block in blocks:
        if block.models and block.remaining:
            key = (tuple(sorted(block.models)), block.expires_at)
            sums[key] = sums.get(key, 0) + block.remaining
    ordered = sorted(sums.items(), key=lambda item: (item[0][0], item[0][1] or 0))
    return tuple((models, expires_at, remaining) for (models, expires_at), remaining in ordered)


class Scopes:
    """A scoped tenant's usage by model per segment (aligned with the account's segments). Not
    thread-safe; its account's owner mutates it."""

    __slots__ = ("segment_model_usage",)

    def __init__(self, segment_model_usage: list[dict[str, int]]) -> None:
        self.segment_model_usage = segment_model_usage

    @classmethod
    def from_index(cls, segment_bounds: Iterable[tuple[int, int, int]], index: UsageIndex) -> Scopes:
        """At the tenant's first scoped grant: each segment's usage by model, from the index. Segments as
        (start, end, usage total); one with no usage is not read."""
        return cls([index.usage_by_model_between(s, e) if usage else {} for s, e, usage in segment_bounds])

    def record(self, segment: int, model: str, amount: int) -> None:
        if amount:  # the account keeps the times of usage; the sums here have nothing to add
            usage = self.segment_model_usage[segment]
            usage[model] = usage.get(model, 0) + amount

    def split_segment(self, segment: int, left: dict[str, int]) -> None:
        """The account split a segment in two; `left`: the usage by model of the first part."""
        usage = self.segment_model_usage[segment]
        right = {model: amount - left.get(model, 0) for model, amount in usage.items()}
        assert all(amount >= 0 for amount in right.values()), f"segment {segment}: split beyond its usage"
        self.segment_model_usage[segment : segment + 1] = [dict(left), {m: a for m, a in right.items() if a}]

    def check(self, segment_usage: list[int]) -> None:
        """Usage by model within each segment's total."""
        assert len(self.segment_model_usage) == len(segment_usage), "scopes and segments out of step"
        for segment, usage in enumerate(self.segment_model_usage):
            assert sum(usage.values()) <= segment_usage[segment], f"segment {segment}: usage by model"
            for model, amount in usage.items():
                assert amount > 0, f"segment {segment}: {model} has {amount}"

    def to_state(self) -> ScopesState:
        return ScopesState(segment_model_usage=[dict(u) for u in self.segment_model_usage])

    @classmethod
    def from_state(cls, state: ScopesState) -> Scopes:
        return cls([dict(u) for u in state.segment_model_usage])
