"""A brute-force replay oracle: the ledger rules written the slow, obvious way.

Every question replays all events in timestamp order from scratch. Nothing here shares code with
ledger.account, so agreement between the two means something.
"""

from __future__ import annotations

from dataclasses import dataclass

from ledger.events import CreditGranted, GrantVoided, UsageRecorded

FOREVER = float("inf")


@dataclass
class OracleBlock:
    grant_id: str
    amount: int
    effective_at: int
    expires_at: int | None
    priority: int
    voided_at: int | None
    consumed: int = 0
    models: tuple[str, ...] = ()  # a scoped grant pays only for these models

    @property
    def end(self) -> float:
        ends = [FOREVER]
        if self.expires_at is not None:
            ends.append(self.expires_at)
        if self.voided_at is not None:
            ends.append(self.voided_at)
        return min(ends)

    @property
    def voided(self) -> bool:
        return self.voided_at is not None and (self.expires_at is None or self.voided_at < self.expires_at)


def distinct_events(events):
    """Drop repeats: the same event id counts once."""
    seen = {}
    for event in events:
        seen.setdefault(event.event_id, event)
    return list(seen.values())


def replay(events, t):
    """Blocks and overage after every usage at or before t."""
    events = distinct_events(events)
    blocks = {}
    for event in events:
        if isinstance(event, CreditGranted):
            blocks[event.grant_id] = OracleBlock(
                event.grant_id,
                event.amount,
                event.effective_at,
                event.expires_at,
                event.priority,
                None,
                models=event.models,
            )
    for event in events:
        if isinstance(event, GrantVoided) and event.grant_id in blocks:
            block = blocks[event.grant_id]
            block.voided_at = (
                event.voided_at if block.voided_at is None else min(block.voided_at, event.voided_at)
            )
    usages = sorted(
        (e for e in events if isinstance(e, UsageRecorded)), key=lambda e: (e.occurred_at, e.event_id)
    )
    overage = 0
    for usage in usages:
        if usage.occurred_at > t:
            break
        need = usage.amount
        active = [b for b in blocks.values() if b.effective_at <= usage.occurred_at < b.end]
        # Scoped blocks naming the usage's model first, the scope with fewest models first, then the rest
        # of the order; then the unscoped blocks. Blocks scoped to other models do not pay.
        active = [b for b in active if not b.models or usage.model in b.models]
        active.sort(
            key=lambda b: (
                0 if b.models else 1,
                len(b.models),
                sorted(b.models),
                b.priority,
                FOREVER if b.expires_at is None else b.expires_at,
                b.effective_at,
                b.grant_id,
            )
        )
        for block in active:
            take = min(need, block.amount - block.consumed)
            block.consumed += take
            need -= take
        overage += need
    return blocks, overage


def balance_at(events, t):
    blocks, _ = replay(events, t)
    return sum(b.amount - b.consumed for b in blocks.values() if b.effective_at <= t < b.end)


def overage_at(events, t):
    return replay(events, t)[1]


def remaining_by_block_at(events, t):
    blocks, _ = replay(events, t)
    return {b.grant_id: b.amount - b.consumed for b in blocks.values() if b.effective_at <= t < b.end}


def totals_at(events, t):
    """(granted, consumed, forfeited, voided, remaining, overage) over blocks effective by t."""
    blocks, overage = replay(events, t)
    granted = consumed = forfeited = voided = remaining = 0
    for b in blocks.values():
        if b.effective_at > t:
            continue
        granted += b.amount
        consumed += b.consumed
        left = b.amount - b.consumed
        if b.end > t:
            remaining += left
        elif b.voided:
            voided += left
        else:
            forfeited += left
    return granted, consumed, forfeited, voided, remaining, overage


def grant_money(events, stream_time):
    """Per paid grant: (price, recognised, breakage, voided, deferred) once every usage applied so far is
    consumed and the ends at or before stream_time are published. Written from the definitions: recognised
    is floor(price * consumed / amount); a published end carries the rest of the price."""
    events = distinct_events(events)
    blocks, _ = replay(events, FOREVER)
    money = {}
    for event in events:
        if not isinstance(event, CreditGranted) or event.category != "paid":
            continue
        block = blocks[event.grant_id]
        price = event.price
        recognised = price * block.consumed // block.amount
        breakage = voided = 0
        if block.end <= stream_time:
            if block.voided:
                voided = price - recognised
            else:
                breakage = price - recognised
        money[event.grant_id] = (price, recognised, breakage, voided, price - recognised - breakage - voided)
    return money
