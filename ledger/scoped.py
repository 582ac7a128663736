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
tenant's account also keeps, per segment, its usage by model, and each model's usage by millisecond (to
split a segment whose usage lies on both sides of a late bound, and to answer a query inside a segment):
that history grows with the tenant's usage, merged per millisecond, and lives in the account state. A
segment is allocated from these sums, so a usage at the frontier costs O(active blocks), and a late event
recomputes the segments from its own on, as for any tenant.

The history starts at the tenant's first scoped grant: usage folded before it has no model in the state
(the usage index beside the account has none either) and counts as usage of no model, drawn from the
unscoped blocks only. A grant that backdates the first scope over usage already folded does not
re-attribute that usage; from the first scoped grant on, every order of events gives the same result.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import msgspec


class ScopedBlock(Protocol):
    grant_id: str
    amount: int
    models: tuple[str, ...]

    @property
    def order_key(self) -> tuple[int, int, int, str]: ...


class ScopesState(msgspec.Struct, frozen=True):
    """The scoped part of `ledger.snapshot.AccountState` (None in the state of a tenant without it)."""

    segment_model_usage: list[dict[str, int]]  # per segment: usage by model
    model_usage_by_time: dict[str, dict[int, int]]  # model -> usage by millisecond


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
    """A scoped tenant's usage by model: per segment (aligned with the account's segments) and by
    millisecond. Not thread-safe; its account's owner mutates it."""

    __slots__ = ("segment_model_usage", "model_usage_by_time")

    def __init__(self, segment_count: int) -> None:
        self.segment_model_usage: list[dict[str, int]] = [{} for _ in range(segment_count)]
        self.model_usage_by_time: dict[str, dict[int, int]] = {}

    def record(self, segment: int, model: str, occurred_at: int, amount: int) -> None:
        if not amount:
            return  # the account keeps the times of usage; the sums here have nothing to add
        usage = self.segment_model_usage[segment]
        usage[model] = usage.get(model, 0) + amount
        by_time = self.model_usage_by_time.get(model)
        if by_time is None:
            by_time = self.model_usage_by_time[model] = {}
        by_time[occurred_at] = by_time.get(occurred_at, 0) + amount

    def usage_between(self, start: int, end: int, models: Iterable[str]) -> dict[str, int]:
        """Usage by model with start <= time < end (models without any left out)."""
        usage = {}
        for model in models:
            total = sum(a for t, a in self.model_usage_by_time.get(model, {}).items() if start <= t < end)
            if total:
                usage[model] = total
        return usage

    def split_segment(self, segment: int, start: int, bound: int, end: int) -> None:
        """The account split segment [start, end) at bound into [start, bound) and [bound, end)."""
        usage = self.segment_model_usage[segment]
        left = self.usage_between(start, bound, usage)
        right = {model: amount - left.get(model, 0) for model, amount in usage.items()}
        self.segment_model_usage[segment : segment + 1] = [left, {m: a for m, a in right.items() if a}]

    def check(self, segment_usage: list[int]) -> None:
        """Usage by model within each segment's total, and the history equal to the segment sums."""
        assert len(self.segment_model_usage) == len(segment_usage), "scopes and segments out of step"
        by_model: dict[str, int] = {}
        for segment, usage in enumerate(self.segment_model_usage):
            assert sum(usage.values()) <= segment_usage[segment], f"segment {segment}: usage by model"
            for model, amount in usage.items():
                assert amount > 0, f"segment {segment}: {model} has {amount}"
                by_model[model] = by_model.get(model, 0) + amount
        for model, by_time in self.model_usage_by_time.items():
            assert sum(by_time.values()) == by_model.get(model, 0), f"{model}: history != segment sums"

    def to_state(self) -> ScopesState:
        return ScopesState(
            segment_model_usage=[dict(u) for u in self.segment_model_usage],
            model_usage_by_time={m: dict(u) for m, u in self.model_usage_by_time.items()},
        )

    @classmethod
    def from_state(cls, state: ScopesState) -> Scopes:
        scopes = cls(0)
        scopes.segment_model_usage = [dict(u) for u in state.segment_model_usage]
        scopes.model_usage_by_time = {m: dict(u) for m, u in state.model_usage_by_time.items()}
        return scopes
