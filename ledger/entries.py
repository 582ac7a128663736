"""Ledger entries: the facts finance reads on `ledger.entries`. Immutable; a fact already published is
never changed, a later event that changes it publishes a correction that references it.

Every entry has a deterministic `entry_id` (a reprocessed event yields the same ids, so consumers can
drop repeats by id) and the `tenant_id` it belongs to.

- UsageAllocated: what one usage event did to each credit block's consumption, and the overage. For a
  usage that arrives in order these are exactly the blocks that paid for it; for a late one they are the
  net change its arrival caused (it may displace later usage between blocks). Always
  sum(allocations) + overage == amount.
- AllocationCorrected: a late grant or void moved already-reported consumption between blocks or
  overage. Deltas may be negative.
- CreditExpired (see ledger.events): a block's remainder forfeited at its expiry.
- CreditVoided: a block's remainder removed by a void.
- EndCorrected: a late event changed a published CreditExpired or CreditVoided by `delta`; `corrects`
  is the entry id of that original.
- GrantRecorded: a grant the fold accepted, with its money terms (what statements count as granted).

Money (schema version 2; see ledger.revenue): a paid grant's price is recognised as its credits are
consumed, with cumulative rounding: once c of its amount credits are consumed, floor(price * c / amount)
is recognised. Each allocation carries the difference its credits made (`money`, negative when a late
event took consumption back); a forfeit carries the breakage, a void the voided money, a correction the
money delta. Summed per grant: recognised + breakage + voided + deferred == price, always.

Booking: every entry has an own time (occurred_at, expired_at, voided_at, or for a correction
`cause_at`, the time of the event that caused it). `booked_at` is None when the entry is booked at its own
time; when that time lies in a period the tenant has closed (ledger.events.PeriodClosed), it is the
close, the start of the first open period, and the entry is an adjustment there.
"""

from __future__ import annotations

import msgspec

from ledger.events import SCHEMA_VERSION, CreditExpired, InvalidEvent


class Allocation(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    grant_id: str
    amount: int
    money: int = 0  # minor units of the grant's currency; omitted (0) for a promotional grant


class UsageAllocated(msgspec.Struct, frozen=True, tag="usage_allocated", tag_field="type", kw_only=True):
    entry_id: str
    tenant_id: str
    event_id: str  # the usage event, i.e. the request id
    occurred_at: int
    model: str
    prompt_tokens: int
    completion_tokens: int
    amount: int
    allocations: tuple[Allocation, ...]
    overage: int
    schema_version: int = SCHEMA_VERSION
    booked_at: int | None = None
    cached_prompt_tokens: int = 0  # of prompt_tokens, those served from a prefix cache
    prompt_version: str | None = None  # the usage event's: the prompt version that built the request
    api_key_id: str | None = None  # the usage event's: the API key (id) the request was made with


class AllocationCorrected(
    msgspec.Struct, frozen=True, tag="allocation_corrected", tag_field="type", kw_only=True
):
    entry_id: str
    tenant_id: str
    cause_event_id: str
    allocations: tuple[Allocation, ...]  # deltas
    overage_delta: int
    schema_version: int = SCHEMA_VERSION
    cause_at: int = 0
    booked_at: int | None = None


class CreditVoided(msgspec.Struct, frozen=True, tag="credit_voided", tag_field="type", kw_only=True):
    entry_id: str
    tenant_id: str
    grant_id: str
    voided_at: int
    amount: int
    schema_version: int = SCHEMA_VERSION
    money: int = 0  # the voided credits' share of a paid grant's price
    booked_at: int | None = None


class EndCorrected(msgspec.Struct, frozen=True, tag="end_corrected", tag_field="type", kw_only=True):
    entry_id: str
    tenant_id: str
    grant_id: str
    corrects: str  # entry id of the CreditExpired or CreditVoided being corrected
    cause_event_id: str
    delta: int
    schema_version: int = SCHEMA_VERSION
    money_delta: int = 0
    cause_at: int = 0
    booked_at: int | None = None


class GrantRecorded(msgspec.Struct, frozen=True, tag="grant_recorded", tag_field="type", kw_only=True):
    entry_id: str
    tenant_id: str
    grant_id: str
    event_id: str  # the CreditGranted
    effective_at: int
    expires_at: int | None
    amount: int
    category: str
    price: int | None
    currency: str | None
    reference: str
    schema_version: int = SCHEMA_VERSION
    booked_at: int | None = None
    models: tuple[str, ...] = ()  # the models its credit pays for (ledger.scoped); empty: any model


Entry = UsageAllocated | AllocationCorrected | CreditExpired | CreditVoided | EndCorrected | GrantRecorded


def check_usage_allocated(entry: UsageAllocated) -> None:
    """The money of one usage entry adds up: sum(allocations) + overage == amount, the amount never
    negative. Asserted where usage is allocated (ledger.account) and again where entries are projected
    (streams.projector); raises AssertionError (a broken fold, never bad input)."""
    assert entry.amount >= 0, f"usage {entry.event_id} has a negative amount {entry.amount}"
    allocated = 0
    for allocation in entry.allocations:
        allocated += allocation.amount
        # Revenue moves with consumption: never against it (floor(price * c / amount) is monotone in c).
        assert allocation.money * allocation.amount >= 0, (
            f"usage {entry.event_id}: {allocation.grant_id} moves {allocation.amount} credits "
            f"but {allocation.money} money"
        )
    assert allocated + entry.overage == entry.amount, (
        f"usage {entry.event_id}: allocations {allocated} + overage {entry.overage} != amount {entry.amount}"
    )


def check_allocation_corrected(entry: AllocationCorrected) -> None:
    """A correction moves usage between blocks and overage, never creates or destroys it: its deltas and
    its overage delta sum to zero."""
    moved = 0
    for allocation in entry.allocations:
        moved += allocation.amount
        assert allocation.money * allocation.amount >= 0, (
            f"correction {entry.entry_id}: {allocation.grant_id} moves {allocation.amount} credits "
            f"but {allocation.money} money"
        )
    assert moved + entry.overage_delta == 0, (
        f"correction {entry.entry_id}: deltas {moved} + overage delta {entry.overage_delta} != 0"
    )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Entry)


def encode_entry(entry: Entry) -> bytes:
    return _encoder.encode(entry)


def decode_entry(data: bytes) -> Entry:
    try:
        return _decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        raise InvalidEvent(f"invalid entry: {error}") from None


def usage_entry_id(tenant_id: str, event_id: str) -> str:
    """A usage event's entry (its event id is the request id)."""
    return f"{tenant_id}/usage/{event_id}"


def expired_entry_id(tenant_id: str, grant_id: str) -> str:
    return f"{tenant_id}/expired/{grant_id}"


def voided_entry_id(tenant_id: str, grant_id: str) -> str:
    return f"{tenant_id}/voided/{grant_id}"


def granted_entry_id(tenant_id: str, grant_id: str) -> str:
    return f"{tenant_id}/granted/{grant_id}"


def reallocation_entry_id(tenant_id: str, cause_event_id: str) -> str:
    return f"{tenant_id}/reallocation/{cause_event_id}"


def end_correction_entry_id(tenant_id: str, cause_event_id: str, grant_id: str) -> str:
    return f"{tenant_id}/end-correction/{cause_event_id}/{grant_id}"
