"""One tenant's credit blocks, folded from grant, void and usage events in any order.

The rules (see the README's "Ledger semantics"):
- A block counts at t iff effective_at <= t < end, where end = min(expires_at, voided_at).
- Usage at u draws from the blocks active at u in the order (priority, expires_at soonest first,
  effective_at, grant_id); what no block covers is overage.
- At a block's end its remainder is forfeited (expiry) or voided (void). A void at the same instant as
  the expiry comes too late: the expiry wins.
- At equal timestamps: grant, void, usage.

The state is a sorted list of boundaries (every effective_at and end) and, for each segment between two
consecutive boundaries, the usage total in it. Inside a segment the set of active blocks does not change,
so greedy consumption of u1..uk there equals greedy consumption of their sum: the state is O(grants),
not O(usage events). A usage in the last computed segment (the frontier) is O(1) amortised whatever its
order inside the segment; a usage in an earlier segment, or a grant or void that lands before the
frontier, recomputes the segments from there on.

Duplicates and the usage history live in a `UsageIndex` beside the state (it grows with usage). The
account asks it whether a usage event was seen, and, rarely, how much usage fell before a time inside a
segment: when a late grant or void splits a segment whose usage lies on both sides, or when a query asks
about a time between two usages of one segment.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from ledger.entries import (
    Allocation,
    AllocationCorrected,
    CreditVoided,
    EndCorrected,
    Entry,
    GrantRecorded,
    UsageAllocated,
    check_allocation_corrected,
    check_usage_allocated,
    end_correction_entry_id,
    expired_entry_id,
    granted_entry_id,
    reallocation_entry_id,
    usage_entry_id,
    voided_entry_id,
)
from ledger.events import (
    RULE_EVENT_TYPES,
    TENANT_CREDIT_MAX,
    CreditExpired,
    CreditGranted,
    GrantVoided,
    InvalidEvent,
    PeriodClosed,
    UsageRecorded,
)
from ledger.revenue import check_grant_money, moved, recognised
from ledger.scoped import Scopes, allocate_segment, scoped_order
from ledger.snapshot import AccountState, BlockState
from ledger.usage_index import UsageIndex, UsageSummary

NEVER = 2**63 - 1  # an end that never comes
NO_USAGE_FIRST = NEVER  # segment_first_usage_at of a segment without usage
NO_USAGE_LAST = -1  # segment_last_usage_at of a segment without usage

EXPIRED = "expired"
VOIDED = "voided"


class ConflictingEvent(InvalidEvent):
    """An event that contradicts one already applied (the same grant id with other terms)."""


@dataclass(slots=True)
class CreditBlock:
    """A credit block and what has happened to it. `consumed` is over all applied usage."""

    grant_id: str
    amount: int
    effective_at: int
    expires_at: int | None
    priority: int
    voided_at: int | None = None
    consumed: int = 0
    reported_end_kind: str | None = None  # EXPIRED or VOIDED once its end was published
    reported_end_amount: int = 0
    reported_end_entry_id: str = ""
    price: int = 0  # minor units of currency; 0 for a promotional grant (ledger.revenue)
    reported_end_money: int = 0  # the money of the published end, corrections included
    models: tuple[str, ...] = ()  # the models it pays for; empty: any (ledger.scoped)

    @property
    def recognised(self) -> int:
        return recognised(self.price, self.amount, self.consumed)

    @property
    def end(self) -> int:
        expires = NEVER if self.expires_at is None else self.expires_at
        voided = NEVER if self.voided_at is None else self.voided_at
        return min(expires, voided)

    @property
    def end_kind(self) -> str:
        if self.voided_at is not None and (self.expires_at is None or self.voided_at < self.expires_at):
            return VOIDED
        return EXPIRED

    @property
    def remaining(self) -> int:
        return self.amount - self.consumed

    @property
    def order_key(self) -> tuple[int, int, int, str]:
        expires = NEVER if self.expires_at is None else self.expires_at
        return (self.priority, expires, self.effective_at, self.grant_id)

    def active_at(self, t: int) -> bool:
        return self.effective_at <= t < self.end


class CreditBlockAt(NamedTuple):
    grant_id: str
    amount: int
    remaining: int
    effective_at: int
    expires_at: int | None
    priority: int
    models: tuple[str, ...] = ()  # the models it pays for; empty: any


class Totals(NamedTuple):
    """Everything that happened up to and including t, over blocks with effective_at <= t."""

    granted: int
    consumed: int
    forfeited: int
    voided: int
    remaining: int
    overage: int


class Statement(NamedTuple):
    """Movements in (start, end] with the balances at both ends."""

    opening_balance: int
    granted: int
    consumed: int
    forfeited: int
    voided: int
    overage: int
    closing_balance: int


class Account:
    """The fold state of one tenant. Not thread-safe; one partition owner mutates it."""

    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        self.blocks: dict[str, CreditBlock] = {}
        self._ordered: list[tuple[tuple[int, int, int, str], CreditBlock]] = []  # by drawing order
        self._pending_voids: dict[str, int] = {}  # voids that arrived before their grant
        self._grant_event_ids: dict[str, str] = {}  # grant id -> event id of its CreditGranted
        # grant id -> (category, price, currency, reference): to refuse a replayed grant with other terms
        self._grant_terms: dict[str, tuple[str, int | None, str | None, str]] = {}
        # Segment j covers [bounds[j-1], bounds[j]); segment 0 is everything before the first boundary.
        self._bounds: list[int] = []
        self._segment_usage: list[int] = [0]
        self._segment_first_usage_at: list[int] = [NO_USAGE_FIRST]
        self._segment_last_usage_at: list[int] = [NO_USAGE_LAST]
        self._segment_allocations: list[dict[str, int]] = [{}]
        self._segment_overage: list[int] = [0]
        # Segments after the frontier hold no usage; allocations are computed up to it.
        self._frontier = 0
        self._frontier_active: list[CreditBlock] = []
        self._frontier_cursor = 0  # blocks before it in _frontier_active are exhausted
        self.overage_total = 0
        self.granted_total = 0  # every block's amount, voided and expired ones too: <= TENANT_CREDIT_MAX
        self.watermark = NO_USAGE_LAST  # stream time up to which ends have been published
        self.closed_until = 0  # the tenant's books are closed before this (PeriodClosed)
        self._scopes: Scopes | None = None  # usage by model, from the tenant's first scoped grant on
        # (segment, its active blocks, its scoped ones in drawing order) last drawn by a scoped tenant; a
        # grant or void (anything that restructures) clears it
        self._scoped_blocks_of: tuple[int, list[CreditBlock], list[CreditBlock]] | None = None

    @property
    def has_scopes(self) -> bool:
        """True once a grant scoped to models was folded in (ledger.scoped)."""
        return self._scopes is not None

    # ----------------------------------------------------------------------------------------- apply

    def apply(
        self, event: CreditGranted | GrantVoided | UsageRecorded | PeriodClosed, index: UsageIndex
    ) -> list[Entry]:
        """Fold one event in; returns the entries it publishes. A duplicate returns no entries."""
        assert event.tenant_id == self.tenant_id, f"event for {event.tenant_id} applied to {self.tenant_id}"
        kind = type(event)
        if kind is UsageRecorded:
            return self.apply_usage(event, index)
        if kind is CreditGranted:
            return self._apply_grant(event, index)
        if kind is GrantVoided:
            return self._apply_void(event, index)
        if kind is PeriodClosed:
            self.closed_until = max(self.closed_until, event.closed_until)
            return []
        if kind in RULE_EVENT_TYPES:  # alert and top-up rules: folded beside the account (ledger.rules)
            return []
        if kind is CreditExpired:
            raise InvalidEvent("credit_expired is derived by the fold and is not accepted as input")
        raise InvalidEvent(f"unknown event type {kind.__name__}")

    def apply_usage(self, event: UsageRecorded, index: UsageIndex) -> list[Entry]:
        """The hot path, callable directly when the caller already knows the event is a usage."""
        event_id = event.event_id
        if index.seen(event_id):
            return []
        occurred_at = event.occurred_at
        amount = event.amount
        assert amount >= 0, f"usage {event_id} has a negative amount {amount}"  # the event type refuses one
        segment = bisect_right(self._bounds, occurred_at)
        self._segment_usage[segment] += amount
        if occurred_at < self._segment_first_usage_at[segment]:
            self._segment_first_usage_at[segment] = occurred_at
        if occurred_at > self._segment_last_usage_at[segment]:
            self._segment_last_usage_at[segment] = occurred_at
        if self._scopes is not None:  # a tenant with scoped grants: its segments are drawn by model
            self._scopes.record(segment, event.model, amount)
            settled = self._redraw_scoped_segment(segment, self._scopes) if segment < self._frontier else None
            deltas, overage = settled if settled is not None else self._recompute_from(segment)
            allocations = self._allocations(deltas)
        elif segment >= self._frontier:
            if segment > self._frontier:
                self._move_frontier(segment)
            allocations, overage = self._consume_at_frontier(amount)
        else:
            settled = self._consume_in_earlier_segment(segment, amount)
            deltas, overage = settled if settled is not None else self._recompute_from(segment)
            allocations = self._allocations(deltas)
        index.record(event_id, occurred_at, amount, event.model)
        closed_until = self.closed_until
        allocated = UsageAllocated(
            entry_id=usage_entry_id(self.tenant_id, event_id),
            tenant_id=self.tenant_id,
            event_id=event_id,
            occurred_at=occurred_at,
            model=event.model,
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            cached_prompt_tokens=event.cached_prompt_tokens,
            prompt_version=event.prompt_version,
            api_key_id=event.api_key_id,
            amount=amount,
            allocations=allocations,
            overage=overage,
            booked_at=None if occurred_at >= closed_until else closed_until,
        )
        check_usage_allocated(allocated)
        entries: list[Entry] = [allocated]
        if self.watermark >= 0:
            self._correct_published_ends([a.grant_id for a in allocations], event_id, occurred_at, entries)
        return entries

    def _booked_at(self, own_time: int) -> int | None:
        """None: booked at its own time; else the close, where it is an adjustment to a closed period."""
        return None if own_time >= self.closed_until else self.closed_until

    def _apply_grant(self, event: CreditGranted, index: UsageIndex) -> list[Entry]:
        grant_id = event.grant_id
        existing = self.blocks.get(grant_id)
        if existing is not None:
            if (
                self._grant_event_ids[grant_id] == event.event_id
                and _same_terms(existing, event)
                and self._grant_terms[grant_id] == _money_terms(event)
            ):
                return []
            raise ConflictingEvent(
                f"grant_id {grant_id!r} was already granted by another event or other terms"
            )
        if self.granted_total + event.amount > TENANT_CREDIT_MAX:
            raise InvalidEvent(
                f"amount: {event.amount} would take the tenant's total granted ({self.granted_total}) "
                f"above TENANT_CREDIT_MAX ({TENANT_CREDIT_MAX})"
            )
        block = CreditBlock(
            grant_id=grant_id,
            amount=event.amount,
            effective_at=event.effective_at,
            expires_at=event.expires_at,
            priority=event.priority,
            voided_at=self._pending_voids.pop(grant_id, None),
            price=event.price or 0,
            models=event.models,
        )
        if block.models and self._scopes is None:  # the first scoped grant: usage by model from the index
            self._scopes = Scopes.from_index(self._segment_spans(), index)
        self.blocks[grant_id] = block
        self.granted_total += block.amount
        self._grant_event_ids[grant_id] = event.event_id
        self._grant_terms[grant_id] = _money_terms(event)
        insort(self._ordered, (block.order_key, block))
        recorded = GrantRecorded(
            entry_id=granted_entry_id(self.tenant_id, grant_id),
            tenant_id=self.tenant_id,
            grant_id=grant_id,
            event_id=event.event_id,
            effective_at=event.effective_at,
            expires_at=event.expires_at,
            amount=event.amount,
            category=event.category,
            price=event.price,
            currency=event.currency,
            reference=event.reference,
            booked_at=self._booked_at(event.effective_at),
            models=event.models,
        )
        return [recorded] + self._restructure(
            event.event_id, block.effective_at, (block.effective_at, block.end), index
        )

    def _apply_void(self, event: GrantVoided, index: UsageIndex) -> list[Entry]:
        block = self.blocks.get(event.grant_id)
        voided_at = event.voided_at
        if block is None:
            earlier = self._pending_voids.get(event.grant_id)
            self._pending_voids[event.grant_id] = voided_at if earlier is None else min(earlier, voided_at)
            return []
        if block.voided_at is not None and block.voided_at <= voided_at:
            return []
        block.voided_at = voided_at
        return self._restructure(event.event_id, voided_at, (voided_at,), index)

    def _restructure(
        self, cause_event_id: str, changed_at: int, new_bounds: tuple[int, ...], index: UsageIndex
    ) -> list[Entry]:
        """After a block was added or its end moved: split segments at the new bounds, recompute the
        segments from the change on, and report what moved."""
        self._scoped_blocks_of = None
        dirty_from = NEVER
        for bound in new_bounds:
            if bound != NEVER:
                dirty_from = min(dirty_from, self._insert_bound(bound, index))
        changed_segment = bisect_right(self._bounds, changed_at)
        dirty_from = min(dirty_from, changed_segment)
        deltas: dict[str, int] = {}
        overage = 0
        if dirty_from <= self._frontier:
            deltas, overage = self._recompute_from(dirty_from)
        else:
            self._rebuild_frontier_active()
        entries: list[Entry] = []
        if deltas or overage:
            corrected = AllocationCorrected(
                entry_id=reallocation_entry_id(self.tenant_id, cause_event_id),
                tenant_id=self.tenant_id,
                cause_event_id=cause_event_id,
                allocations=self._allocations(deltas),
                overage_delta=overage,
                cause_at=changed_at,
                booked_at=self._booked_at(changed_at),
            )
            check_allocation_corrected(corrected)
            entries.append(corrected)
        if self.watermark >= 0:
            touched = set(deltas)
            touched.update(b.grant_id for b in self.blocks.values() if b.reported_end_kind is not None)
            self._correct_published_ends(touched, cause_event_id, changed_at, entries)
            self._publish_ends_through(self.watermark, entries)
        return entries

    # ------------------------------------------------------------------------------------- segments

    def _allocations(self, deltas: dict[str, int]) -> tuple[Allocation, ...]:
        """Allocation rows for net consumption changes already applied to the blocks, with their money."""
        rows = []
        for grant_id, amount in sorted(deltas.items()):
            block = self.blocks[grant_id]
            money = moved(block.price, block.amount, block.consumed - amount, block.consumed)
            rows.append(Allocation(grant_id, amount, money))
        return tuple(rows)

    def _segment_start(self, segment: int) -> int:
        return self._bounds[segment - 1] if segment > 0 else -NEVER

    def _segment_spans(self) -> list[tuple[int, int, int]]:
        """(start, end, usage total) of every segment."""
        starts = [-NEVER, *self._bounds]
        ends = [*self._bounds, NEVER]
        return list(zip(starts, ends, self._segment_usage, strict=True))

    def _insert_bound(self, bound: int, index: UsageIndex) -> int:
        """Split the segment containing `bound` at it. Returns the first segment whose allocations are
        no longer valid (NEVER if none)."""
        position = bisect_left(self._bounds, bound)
        if position < len(self._bounds) and self._bounds[position] == bound:
            return NEVER
        segment = position  # the segment that contains bound, before the split
        start = self._segment_start(segment)
        usage = self._segment_usage[segment]
        first = self._segment_first_usage_at[segment]
        last = self._segment_last_usage_at[segment]
        # By the usage's timestamps, not its total: zero-amount usage has times too.
        if last < bound:
            left, right = (usage, first, last), (0, NO_USAGE_FIRST, NO_USAGE_LAST)
        elif first >= bound:
            left, right = (0, NO_USAGE_FIRST, NO_USAGE_LAST), (usage, first, last)
        else:
            before = index.usage_between(start, bound)
            after = index.usage_between(
                bound, NEVER if segment == len(self._bounds) else self._bounds[segment]
            )
            assert before.total + after.total == usage, (
                f"usage index disagrees with segment total for {self.tenant_id}: "
                f"{before.total} + {after.total} != {usage}"
            )
            left, right = _segment_usage_of(before), _segment_usage_of(after)
        if self._scopes is not None:
            if last < bound or first >= bound:
                left_models = self._scopes.segment_model_usage[segment] if last < bound else {}
            else:
                left_models = index.usage_by_model_between(start, bound)
            self._scopes.split_segment(segment, left_models)
        self._bounds.insert(position, bound)
        self._segment_usage[segment : segment + 1] = [left[0], right[0]]
        self._segment_first_usage_at[segment : segment + 1] = [left[1], right[1]]
        self._segment_last_usage_at[segment : segment + 1] = [left[2], right[2]]
        self._segment_allocations.insert(segment + 1, {})
        self._segment_overage.insert(segment + 1, 0)
        if self._frontier > segment or (self._frontier == segment and right[0] > 0):
            self._frontier += 1
        return segment if usage > 0 and right[0] > 0 else NEVER

    def _active_blocks(self, segment: int) -> list[CreditBlock]:
        start = self._segment_start(segment)
        return [block for _, block in self._ordered if block.effective_at <= start < block.end]

    def _move_frontier(self, segment: int) -> None:
        self._frontier = segment
        self._rebuild_frontier_active()

    def _rebuild_frontier_active(self) -> None:
        self._frontier_active = self._active_blocks(self._frontier)
        self._frontier_cursor = 0

    def _consume_at_frontier(self, amount: int) -> tuple[tuple[Allocation, ...], int]:
        """Greedy consumption of `amount` in the frontier segment. Returns (what each block gave, in
        drawing order; the overage)."""
        active = self._frontier_active
        cursor = self._frontier_cursor
        segment_allocations = self._segment_allocations[self._frontier]
        if amount and cursor < len(active):  # fast path: the first block in line covers it all
            block = active[cursor]
            consumed = block.consumed
            if block.amount - consumed > amount:
                block.consumed = consumed + amount
                grant_id = block.grant_id
                segment_allocations[grant_id] = segment_allocations.get(grant_id, 0) + amount
                price = block.price
                if price:  # ledger.revenue.moved, inline: this is the path every usage takes
                    money = price * (consumed + amount) // block.amount - price * consumed // block.amount
                    return (Allocation(grant_id, amount, money),), 0
                return (Allocation(grant_id, amount),), 0
        taken: tuple[Allocation, ...] = ()
        while amount and cursor < len(active):
            block = active[cursor]
            remaining = block.amount - block.consumed
            if remaining <= 0:
                cursor += 1
                continue
            take = remaining if remaining < amount else amount
            money = moved(block.price, block.amount, block.consumed, block.consumed + take)
            block.consumed += take
            grant_id = block.grant_id
            segment_allocations[grant_id] = segment_allocations.get(grant_id, 0) + take
            taken += (Allocation(grant_id, take, money),)
            amount -= take
            if take == remaining:
                cursor += 1
        self._frontier_cursor = cursor
        if amount:
            self._segment_overage[self._frontier] += amount
            self.overage_total += amount
        return taken, amount

    def _consume_in_earlier_segment(self, segment: int, amount: int) -> tuple[dict[str, int], int] | None:
        """A late usage in a segment before the frontier. Greedy consumption of a segment's sum is a
        prefix: the new usage takes from the blocks that still had a remainder at the end of its segment.
        If none of those blocks is exhausted later on (total consumption plus the take stays within
        its amount), every later segment's allocation stands and only this segment changes. Returns
        None when that does not hold and the segments from here must be recomputed."""
        start = self._segment_start(segment)
        later_allocations = self._segment_allocations[segment + 1 : self._frontier + 1]
        takes: dict[str, int] = {}
        need = amount
        for _, block in self._ordered:
            if not need:
                break
            if not block.effective_at <= start < block.end:
                continue
            grant_id = block.grant_id
            consumed_through_segment = block.consumed - sum(a.get(grant_id, 0) for a in later_allocations)
            remaining = block.amount - consumed_through_segment
            if remaining <= 0:
                continue
            take = remaining if remaining < need else need
            if block.consumed + take > block.amount:
                return None
            takes[grant_id] = take
            need -= take
        allocations = self._segment_allocations[segment]
        for grant_id, take in takes.items():
            self.blocks[grant_id].consumed += take
            allocations[grant_id] = allocations.get(grant_id, 0) + take
        if need:
            self._segment_overage[segment] += need
            self.overage_total += need
        return takes, need

    def _redraw_scoped_segment(self, segment: int, scopes: Scopes) -> tuple[dict[str, int], int] | None:
        """A late usage of a scoped tenant in a segment before the frontier: redraw that segment alone.
        If no block gives less there (nor the overage shrinks), and none it gives more is exhausted later on
        (its total consumption plus the increase stays within its amount), every later segment's
        allocation stands, as in `_consume_in_earlier_segment`. Returns None when that does not hold:
        recompute from here on."""
        cached = self._scoped_blocks_of
        if cached is None or cached[0] != segment:
            active = self._active_blocks(segment)
            cached = self._scoped_blocks_of = (segment, active, scoped_order(active))
        _, active, scoped = cached
        later_allocations = self._segment_allocations[segment + 1 : self._frontier + 1]
        drawn = self._segment_allocations[segment]
        remaining = {}
        for block in active:
            grant_id = block.grant_id
            later = sum(a.get(grant_id, 0) for a in later_allocations)
            remaining[grant_id] = block.amount - (block.consumed - drawn.get(grant_id, 0) - later)
        takes, overage = allocate_segment(
            active, scoped, remaining, scopes.segment_model_usage[segment], self._segment_usage[segment]
        )
        deltas = {}
        for grant_id in drawn.keys() | takes.keys():
            delta = takes.get(grant_id, 0) - drawn.get(grant_id, 0)
            if delta < 0:
                return None
            if delta:
                block = self.blocks[grant_id]
                if block.consumed + delta > block.amount:
                    return None
                deltas[grant_id] = delta
        overage_delta = overage - self._segment_overage[segment]
        if overage_delta < 0:
            return None
        for grant_id, delta in deltas.items():
            self.blocks[grant_id].consumed += delta
        self._segment_allocations[segment] = takes
        self._segment_overage[segment] = overage
        self.overage_total += overage_delta
        return deltas, overage_delta

    def _recompute_from(self, first_segment: int) -> tuple[dict[str, int], int]:
        """Redo greedy consumption of every segment from first_segment on. Returns the net change per
        block and in overage."""
        if self._scopes is not None:
            return self._recompute_scoped_from(first_segment, self._scopes)
        consumed_before: dict[str, int] = {}
        overage_before = self.overage_total
        for segment in range(first_segment, len(self._segment_allocations)):
            allocations = self._segment_allocations[segment]
            for grant_id, amount in allocations.items():
                block = self.blocks[grant_id]
                consumed_before.setdefault(grant_id, block.consumed)
                block.consumed -= amount
            allocations.clear()
            self.overage_total -= self._segment_overage[segment]
            self._segment_overage[segment] = 0
        for segment in range(first_segment, len(self._segment_usage)):
            usage = self._segment_usage[segment]
            if usage:
                self._move_frontier(segment)
                for allocation in self._consume_at_frontier(usage)[0]:
                    grant_id = allocation.grant_id
                    consumed_before.setdefault(grant_id, self.blocks[grant_id].consumed - allocation.amount)
        self._settle_frontier()
        deltas = {}
        for grant_id, before in consumed_before.items():
            delta = self.blocks[grant_id].consumed - before
            if delta:
                deltas[grant_id] = delta
        return deltas, self.overage_total - overage_before

    def _recompute_scoped_from(self, first_segment: int, scopes: Scopes) -> tuple[dict[str, int], int]:
        """`_recompute_from` for a tenant with scoped grants: each segment drawn by model
        (ledger.scoped.allocate_segment)."""
        consumed_before: dict[str, int] = {}
        overage_before = self.overage_total
        last = max(self._frontier, first_segment)  # segments after it hold no usage, no allocations
        for segment in range(first_segment, last + 1):
            for grant_id, amount in self._segment_allocations[segment].items():
                block = self.blocks[grant_id]
                consumed_before.setdefault(grant_id, block.consumed)
                block.consumed -= amount
            self._segment_allocations[segment] = {}
            self.overage_total -= self._segment_overage[segment]
            self._segment_overage[segment] = 0
        for segment in range(first_segment, last + 1):
            total = self._segment_usage[segment]
            if not total:
                continue
            cached = self._scoped_blocks_of
            if cached is None or cached[0] != segment:
                active = self._active_blocks(segment)
                cached = self._scoped_blocks_of = (segment, active, scoped_order(active))
            _, active, scoped = cached
            remaining = {block.grant_id: block.amount - block.consumed for block in active}
            usage = scopes.segment_model_usage[segment]
            takes, overage = allocate_segment(active, scoped, remaining, usage, total)
            for grant_id, take in takes.items():
                block = self.blocks[grant_id]
                consumed_before.setdefault(grant_id, block.consumed)
                block.consumed += take
            self._segment_allocations[segment] = takes
            self._segment_overage[segment] = overage
            self.overage_total += overage
        frontier = last  # the last segment holding usage; the unscoped fast path's blocks are not kept
        while frontier > 0 and self._segment_usage[frontier] == 0:
            frontier -= 1
        self._frontier = frontier
        deltas = {}
        for grant_id, before in consumed_before.items():
            delta = self.blocks[grant_id].consumed - before
            if delta:
                deltas[grant_id] = delta
        return deltas, self.overage_total - overage_before

    def _settle_frontier(self) -> None:
        """The frontier is the last segment holding usage (segment 0 when none does)."""
        frontier = len(self._bounds)
        while frontier > 0 and self._segment_usage[frontier] == 0:
            frontier -= 1
        if frontier != self._frontier:
            self._move_frontier(frontier)
        else:
            self._rebuild_frontier_active()
        self._skip_exhausted()

    def _skip_exhausted(self) -> None:
        active = self._frontier_active
        cursor = 0
        while cursor < len(active) and active[cursor].amount - active[cursor].consumed <= 0:
            cursor += 1
        self._frontier_cursor = cursor

    # ------------------------------------------------------------------------ published block ends

    def advance_to(self, stream_time: int) -> list[Entry]:
        """Publish the expiries and voids of blocks whose end is at or before stream_time."""
        entries: list[Entry] = []
        if stream_time > self.watermark:
            self.watermark = stream_time
            self._publish_ends_through(stream_time, entries)
        return entries

    def _publish_ends_through(self, stream_time: int, entries: list[Entry]) -> None:
        for block in self.blocks.values():
            if block.reported_end_kind is None and block.end <= stream_time:
                entries.append(self._publish_end(block))

    def _publish_end(self, block: CreditBlock) -> Entry:
        kind = block.end_kind
        amount = block.remaining
        assert amount >= 0, f"{block.grant_id} ends with a negative remainder {amount}"
        money = block.price - block.recognised  # the remainder's share: nothing deferred is left
        check_grant_money(block.grant_id, block.price, block.recognised, money, 0)
        block.reported_end_kind = kind
        block.reported_end_amount = amount
        block.reported_end_money = money
        # A void dated before the grant took effect: the credit was granted and removed at once.
        ended_at = max(block.end, block.effective_at)
        booked_at = self._booked_at(ended_at)
        if kind == EXPIRED:
            entry_id = expired_entry_id(self.tenant_id, block.grant_id)
            entry: Entry = CreditExpired(
                event_id=entry_id,
                tenant_id=self.tenant_id,
                grant_id=block.grant_id,
                expired_at=ended_at,
                amount=amount,
                money=money,
                booked_at=booked_at,
            )
        else:
            entry_id = voided_entry_id(self.tenant_id, block.grant_id)
            entry = CreditVoided(
                entry_id=entry_id,
                tenant_id=self.tenant_id,
                grant_id=block.grant_id,
                voided_at=ended_at,
                amount=amount,
                money=money,
                booked_at=booked_at,
            )
        block.reported_end_entry_id = entry_id
        return entry

    def _correct_published_ends(
        self, touched: Iterable[str], cause_event_id: str, cause_at: int, entries: list[Entry]
    ) -> None:
        """For each touched block whose end was already published, publish what changed about it."""
        for grant_id in touched:
            block = self.blocks[grant_id]
            if block.reported_end_kind is None:
                continue
            same_kind = block.reported_end_kind == block.end_kind
            delta = (block.remaining if same_kind else 0) - block.reported_end_amount
            money_delta = (block.price - block.recognised if same_kind else 0) - block.reported_end_money
            if delta or money_delta:
                entries.append(
                    EndCorrected(
                        entry_id=end_correction_entry_id(self.tenant_id, cause_event_id, grant_id),
                        tenant_id=self.tenant_id,
                        grant_id=grant_id,
                        corrects=block.reported_end_entry_id,
                        cause_event_id=cause_event_id,
                        delta=delta,
                        money_delta=money_delta,
                        cause_at=cause_at,
                        booked_at=self._booked_at(cause_at),
                    )
                )
                block.reported_end_amount += delta
                block.reported_end_money += money_delta
                if same_kind:
                    _check_money(block, deferred=0)
            if not same_kind:
                entries.append(self._publish_end(block))

    # --------------------------------------------------------------------------------------- queries

    def _consumption_through(self, t: int, index: UsageIndex) -> tuple[dict[str, int], int]:
        """Per-block consumption and overage from usage at or before t."""
        segment = bisect_right(self._bounds, t)
        consumed: dict[str, int] = {}
        overage = 0
        for earlier in range(min(segment, self._frontier + 1)):
            for grant_id, amount in self._segment_allocations[earlier].items():
                consumed[grant_id] = consumed.get(grant_id, 0) + amount
            overage += self._segment_overage[earlier]
        if segment > self._frontier or self._segment_usage[segment] == 0:
            return consumed, overage
        if t >= self._segment_last_usage_at[segment]:
            for grant_id, amount in self._segment_allocations[segment].items():
                consumed[grant_id] = consumed.get(grant_id, 0) + amount
            return consumed, overage + self._segment_overage[segment]
        if t < self._segment_first_usage_at[segment]:
            return consumed, overage
        usage = index.usage_between(self._segment_start(segment), t + 1).total
        if self._scopes is not None:
            return self._scoped_consumption_through(segment, t, usage, consumed, overage, index)
        for block in self._active_blocks(segment):
            if not usage:
                break
            remaining = block.amount - consumed.get(block.grant_id, 0)
            take = min(remaining, usage)
            if take > 0:
                consumed[block.grant_id] = consumed.get(block.grant_id, 0) + take
                usage -= take
        return consumed, overage + usage

    def _scoped_consumption_through(
        self, segment: int, t: int, usage: int, consumed: dict[str, int], overage: int, index: UsageIndex
    ) -> tuple[dict[str, int], int]:
        """The end of `_consumption_through` for a tenant with scoped grants: the segment's usage at or
        before t (`usage`) drawn by model."""
        active = self._active_blocks(segment)
        remaining = {block.grant_id: block.amount - consumed.get(block.grant_id, 0) for block in active}
        start = self._segment_start(segment)
        model_usage = index.usage_by_model_between(start, t + 1)
        takes, segment_overage = allocate_segment(active, scoped_order(active), remaining, model_usage, usage)
        for grant_id, take in takes.items():
            consumed[grant_id] = consumed.get(grant_id, 0) + take
        return consumed, overage + segment_overage

    def balance_at(self, t: int, index: UsageIndex) -> int:
        consumed, _ = self._consumption_through(t, index)
        return sum(b.amount - consumed.get(b.grant_id, 0) for b in self.blocks.values() if b.active_at(t))

    def overage_at(self, t: int, index: UsageIndex) -> int:
        return self._consumption_through(t, index)[1]

    def blocks_at(self, t: int, index: UsageIndex) -> list[CreditBlockAt]:
        """The blocks that count at t, in drawing order, with what remains of each."""
        consumed, _ = self._consumption_through(t, index)
        return [
            CreditBlockAt(
                b.grant_id,
                b.amount,
                b.amount - consumed.get(b.grant_id, 0),
                b.effective_at,
                b.expires_at,
                b.priority,
                b.models,
            )
            for _, b in self._ordered
            if b.active_at(t)
        ]

    def totals_at(self, t: int, index: UsageIndex) -> Totals:
        consumed_by_block, overage = self._consumption_through(t, index)
        granted = consumed = forfeited = voided = remaining = 0
        for block in self.blocks.values():
            if block.effective_at > t:
                continue
            used = consumed_by_block.get(block.grant_id, 0)
            granted += block.amount
            consumed += used
            if block.end > t:
                remaining += block.amount - used
            elif block.end_kind == EXPIRED:
                forfeited += block.amount - used
            else:
                voided += block.amount - used
        return Totals(granted, consumed, forfeited, voided, remaining, overage)

    def statement(self, start: int, end: int, index: UsageIndex) -> Statement:
        """Movements in (start, end]."""
        assert start <= end, f"statement window reversed: {start} > {end}"
        opening = self.totals_at(start, index)
        closing = self.totals_at(end, index)
        return Statement(
            opening_balance=opening.remaining,
            granted=closing.granted - opening.granted,
            consumed=closing.consumed - opening.consumed,
            forfeited=closing.forfeited - opening.forfeited,
            voided=closing.voided - opening.voided,
            overage=closing.overage - opening.overage,
            closing_balance=closing.remaining,
        )

    def check_invariants(self, index: UsageIndex | None = None) -> None:
        """Conservation and the bookkeeping that the fast path relies on; raises AssertionError. With the
        usage index beside the account (O(usage): for tests), also that a scoped tenant's sums by model
        are the index's."""
        by_block: dict[str, int] = {}
        for segment, allocations in enumerate(self._segment_allocations):
            for grant_id, amount in allocations.items():
                assert amount > 0, f"segment {segment} allocates {amount} from {grant_id}"
                by_block[grant_id] = by_block.get(grant_id, 0) + amount
        for block in self.blocks.values():
            assert by_block.get(block.grant_id, 0) == block.consumed, (
                f"{block.grant_id}: allocations != consumed"
            )
            assert block.consumed >= 0, f"{block.grant_id}: consumed {block.consumed}, a negative amount"
            assert block.consumed <= block.amount, (
                f"{block.grant_id}: consumed {block.consumed} of {block.amount}"
            )
            deferred = block.price - block.recognised - block.reported_end_money
            _check_money(block, deferred)
            if block.reported_end_kind is None:
                assert block.reported_end_money == 0, f"{block.grant_id}: end money before its end"
            else:
                assert deferred == 0, f"{block.grant_id}: {deferred} deferred after its end was published"
        assert sum(self._segment_overage) == self.overage_total, "overage total drifted"
        granted = sum(b.amount for b in self.blocks.values())
        assert self.granted_total == granted, f"granted total {self.granted_total} drifted from {granted}"
        assert self.granted_total <= TENANT_CREDIT_MAX, (
            f"granted total {self.granted_total} > TENANT_CREDIT_MAX"
        )
        assert all(u == 0 for u in self._segment_usage[self._frontier + 1 :]), "usage past the frontier"
        assert len(self._segment_usage) == len(self._bounds) + 1, "segments and bounds out of step"
        if self._scopes is not None:
            self._scopes.check(self._segment_usage)
            if index is not None:
                for segment, (start, end, _) in enumerate(self._segment_spans()):
                    assert self._scopes.segment_model_usage[segment] == index.usage_by_model_between(
                        start, end
                    ), f"segment {segment}: usage by model differs from the usage index"

    # ------------------------------------------------------------------------------------ snapshots

    def to_state(self) -> AccountState:
        return AccountState(
            tenant_id=self.tenant_id,
            blocks=[
                BlockState(
                    b.grant_id,
                    b.amount,
                    b.effective_at,
                    b.expires_at,
                    b.priority,
                    b.voided_at,
                    b.consumed,
                    b.reported_end_kind,
                    b.reported_end_amount,
                    b.reported_end_entry_id,
                    self._grant_event_ids[b.grant_id],
                    *self._grant_terms[b.grant_id],
                    b.reported_end_money,
                    b.models,
                )
                for b in self.blocks.values()
            ],
            pending_voids=dict(self._pending_voids),
            bounds=list(self._bounds),
            segment_usage=list(self._segment_usage),
            segment_first_usage_at=list(self._segment_first_usage_at),
            segment_last_usage_at=list(self._segment_last_usage_at),
            segment_allocations=[dict(a) for a in self._segment_allocations],
            segment_overage=list(self._segment_overage),
            overage_total=self.overage_total,
            watermark=self.watermark,
            closed_until=self.closed_until,
            scopes=None if self._scopes is None else self._scopes.to_state(),
        )

    @classmethod
    def from_state(cls, state: AccountState) -> Account:
        account = cls(state.tenant_id)
        for s in state.blocks:
            block = CreditBlock(
                s.grant_id,
                s.amount,
                s.effective_at,
                s.expires_at,
                s.priority,
                s.voided_at,
                s.consumed,
                s.reported_end_kind,
                s.reported_end_amount,
                s.reported_end_entry_id,
                s.price or 0,
                s.reported_end_money,
                tuple(s.models),
            )
            account.blocks[block.grant_id] = block
            account._grant_terms[block.grant_id] = (s.category, s.price, s.currency, s.reference)
            account.granted_total += block.amount
            account._grant_event_ids[block.grant_id] = s.grant_event_id
            account._ordered.append((block.order_key, block))
        account._ordered.sort(key=lambda pair: pair[0])
        account._pending_voids = dict(state.pending_voids)
        account._bounds = list(state.bounds)
        account._segment_usage = list(state.segment_usage)
        account._segment_first_usage_at = list(state.segment_first_usage_at)
        account._segment_last_usage_at = list(state.segment_last_usage_at)
        account._segment_allocations = [dict(a) for a in state.segment_allocations]
        account._segment_overage = list(state.segment_overage)
        account.overage_total = state.overage_total
        account.watermark = state.watermark
        account.closed_until = state.closed_until
        if state.scopes is not None:
            account._scopes = Scopes.from_state(state.scopes)
        account._settle_frontier()
        account.check_invariants()
        return account


def _segment_usage_of(summary: UsageSummary) -> tuple[int, int, int]:
    """(total, first usage time, last usage time) of a segment, with the sentinels when it has none."""
    if summary.first_at is None:
        return (0, NO_USAGE_FIRST, NO_USAGE_LAST)
    return (summary.total, summary.first_at, summary.last_at)


def _same_terms(block: CreditBlock, event: CreditGranted) -> bool:
    return (block.amount, block.effective_at, block.expires_at, block.priority, block.models) == (
        event.amount,
        event.effective_at,
        event.expires_at,
        event.priority,
        event.models,
    )


def _money_terms(event: CreditGranted) -> tuple[str, int | None, str | None, str]:
    return (event.category, event.price, event.currency, event.reference)


def _check_money(block: CreditBlock, deferred: int) -> None:
    check_grant_money(block.grant_id, block.price, block.recognised, block.reported_end_money, deferred)
