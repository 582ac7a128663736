"""The account state as bytes: what a changelog-backed table or a checkpoint stores. O(grants)."""

from __future__ import annotations

import msgspec

from ledger.scoped import ScopesState

SNAPSHOT_VERSION = 1


class BlockState(msgspec.Struct, array_like=True, frozen=True):
    grant_id: str
    amount: int
    effective_at: int
    expires_at: int | None
    priority: int
    voided_at: int | None
    consumed: int
    reported_end_kind: str | None
    reported_end_amount: int
    reported_end_entry_id: str
    grant_event_id: str
    # money terms (schema version 2 grants); a version 1 snapshot has none: promotional
    category: str = "promotional"
    price: int | None = None
    currency: str | None = None
    reference: str = ""
    reported_end_money: int = 0
    models: tuple[str, ...] = ()  # a grant scoped to models (ledger.scoped); empty in older snapshots


class AccountState(msgspec.Struct, frozen=True):
    tenant_id: str
    blocks: list[BlockState]
    pending_voids: dict[str, int]
    bounds: list[int]
    segment_usage: list[int]
    segment_first_usage_at: list[int]
    segment_last_usage_at: list[int]
    segment_allocations: list[dict[str, int]]
    segment_overage: list[int]
    overage_total: int
    watermark: int
    version: int = SNAPSHOT_VERSION
    closed_until: int = 0  # PeriodClosed
    scopes: ScopesState | None = None  # only a tenant with a scoped grant has it (ledger.scoped)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AccountState)


def account_to_bytes(account) -> bytes:
    return _encoder.encode(account.to_state())


def account_from_bytes(data: bytes):
    from ledger.account import Account

    state = _decoder.decode(data)
    if state.version != SNAPSHOT_VERSION:
        raise ValueError(f"account snapshot version {state.version} is not {SNAPSHOT_VERSION}")
    return Account.from_state(state)
