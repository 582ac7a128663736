"""The records every log carries, transport-free: what a consumer reads and where an append went; and
the wire schemas of the topics besides the ledger's own (its events and entries are defined in
`ledger/`): balances and dead letters from the processor, key revocations from the admin API.

    ledger.balances  BalanceRecord  (key = tenant id; compacted)
    ledger.dlq       DeadLetter     (key = the rejected record's key)
    tenant.keys      ApiKeyRevoked  (key = key id; compacted)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import msgspec
from aiokafka.partitioner import murmur2

REVOCATION_SCHEMA_VERSION = 1


class LogRecord(NamedTuple):  # a tuple: one per record a processor folds (a dataclass costs far more)
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int = 0  # the log's append time; 0 where a test or tool does not know it


@dataclass(frozen=True, slots=True)
class LogPosition:
    """Where an appended record went; `spooled` when the broker was away and it waits in the spool."""

    topic: str
    partition: int | None
    offset: int | None
    spooled: bool = False


def partition_for_key(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (murmur2, positive, modulo), so both logs place a key alike."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """What `ledger.dlq` holds for a rejected record: why, where it came from, and its bytes."""

    reason: str
    source_topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None  # base64 in JSON
    value: bytes | None


class BalanceRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The latest balance of a tenant, on the compacted `ledger.balances` (key = tenant id)."""

    tenant_id: str
    balance: int
    overage: int
    as_of: int  # epoch ms the balance is computed at
    applied_offset: int  # highest source offset folded in
    # (expires_at, remaining) of the blocks in `balance` that expire, so admission can stop counting a
    # block at its expiry, before the forfeit is published (gateway.ledger_view). Empty in older records.
    expiring: tuple[tuple[int, int], ...] = ()
    # (grant_id, effective_at, amount, expires_at) of the grants not yet effective at `as_of`, soonest
    # first: the pending balance (README "Three balances"). Empty in older records.
    pending: tuple[tuple[str, int, int, int | None], ...] = ()
    # (models, expires_at, remaining) of the blocks in `balance` scoped to models, summed per scope and
    # expiry (ledger.scoped.scoped_credit): a request of model M may spend the balance less the credit
    # scoped to other models (gateway.ledger_view). Empty for a tenant without scoped grants.
    scoped: tuple[tuple[tuple[str, ...], int | None, int], ...] = ()


class ApiKeyRevoked(msgspec.Struct, frozen=True, tag="api_key_revoked", tag_field="type", kw_only=True):
    """On `tenant.keys` (key = key id), published by the admin API: every gateway evicts the key at once."""

    key_id: str
    tenant_id: str
    revoked_at: int  # epoch ms
    schema_version: int = REVOCATION_SCHEMA_VERSION


_revocation_decoder = msgspec.json.Decoder(ApiKeyRevoked)


def encode_revocation(revocation: ApiKeyRevoked) -> bytes:
    return msgspec.json.encode(revocation)


def decode_revocation(value: bytes) -> ApiKeyRevoked:
    """Raises msgspec.DecodeError (a ValueError) on anything else."""
    return _revocation_decoder.decode(value)
