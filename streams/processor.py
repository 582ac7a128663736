"""The ledger processor: source records in, entries, balances, dead letters and state writes out.

It owns no transport. The Kafka batch engine (streams.batch_processor), the faust agent
(streams.faust_app), the embedded log's driver and the audit replay all call
`LedgerProcessor.process(partition, records)` and then, in this order:
  1. publish `output.entries`, `output.balances` and `output.dead_letters` and wait for the acks;
  2. persist `output.state_writes` in order (the batch's seen usage ids per tenant first, account
     snapshots last), on the owning partition's changelog.
A crash between 1 and 2 reprocesses the batch: the same entries are published again with the same
entry ids (consumers keep one per id). A crash during 2 leaves a prefix of the writes: a seen-id
written without its account snapshot is recognised by its source offset and applied again; an account
written is never applied twice, because each snapshot carries the highest source offset it includes.

Usage for a tenant without a single grant on this partition is dead-lettered ("unknown tenant"), not
folded as overage: admission needs credit, so legitimate usage always follows its tenant's first grant
on the same partition (same key, same partition), and anything else was not admitted by a gateway.

Dedupe, two ways: a record redelivered after a crash has an offset at or below the tenant's
`applied_offset`; the same event produced twice (a producer resend) has another offset, and its event
id is in the seen index with the first offset.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from ledger.account import Account
from ledger.codec import decode_input_event
from ledger.entries import Entry, encode_entry
from ledger.events import InvalidEvent, UsageRecorded
from ledger.snapshot import account_from_bytes, account_to_bytes
from ledger.usage_index import InMemoryUsageIndex
from streams.records import LogRecord, partition_for_key

log = logging.getLogger(__name__)

ACCOUNT_KEY_PREFIX = b"a/"
SEEN_KEY_PREFIX = b"s/"


@dataclass(frozen=True, slots=True)
class OutputRecord:
    key: bytes
    value: bytes


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


class AccountRecord(msgspec.Struct, frozen=True, array_like=True):
    """An account snapshot with the highest source offset it includes."""

    applied_offset: int
    stream_time: int
    snapshot: bytes


class SeenRecord(msgspec.Struct, frozen=True, array_like=True):
    """A usage event applied at `offset`. Stored in batches: one state write per tenant per batch."""

    event_id: str
    offset: int
    occurred_at: int
    amount: int


@dataclass
class ProcessorOutput:
    entries: list[OutputRecord] = field(default_factory=list)
    balances: list[OutputRecord] = field(default_factory=list)
    dead_letters: list[OutputRecord] = field(default_factory=list)
    state_writes: list[tuple[bytes, bytes]] = field(default_factory=list)
    applied_events: int = 0
    duplicate_events: int = 0


class StateReader(Protocol):
    """Read access to the durable state of one processor (a faust table, a Postgres table, a dict)."""

    def get(self, key: bytes) -> bytes | None: ...

    def items_with_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]: ...


_json = msgspec.json.Encoder()
_account_record_codec = (msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(AccountRecord))
_seen_batch_codec = (msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(list[SeenRecord]))


def account_key(tenant_id: str) -> bytes:
    return ACCOUNT_KEY_PREFIX + tenant_id.encode()


def seen_batch_key(tenant_id: str, first_offset: int) -> bytes:
    """The key of a tenant's usage ids applied in one batch, named by the batch's first source offset."""
    return SEEN_KEY_PREFIX + tenant_id.encode() + b"/" + b"%020d" % first_offset


class _OffsetAwareIndex:
    """The usage index of one tenant as the processor sees it. An event id is a duplicate when it was
    first applied at another source offset; at the same offset it is this record, redelivered."""

    __slots__ = ("index", "current_offset", "first_offsets")

    def __init__(self) -> None:
        self.index = InMemoryUsageIndex()
        self.first_offsets: dict[str, int] = {}
        self.current_offset = -1

    def seen(self, event_id: str) -> bool:
        first = self.first_offsets.get(event_id)
        return first is not None and first != self.current_offset

    def record(self, event_id: str, occurred_at: int, amount: int) -> None:
        self.first_offsets[event_id] = self.current_offset
        self.index.record(event_id, occurred_at, amount)

    def usage_between(self, start: int, end: int):
        return self.index.usage_between(start, end)


@dataclass
class _Tenant:
    account: Account
    index: _OffsetAwareIndex
    applied_offset: int
    stream_time: int


class LedgerProcessor:
    """Folds ledger events into per-tenant accounts. One instance per process; not thread-safe."""

    def __init__(self, state: StateReader, *, source_topic: str) -> None:
        self._state = state
        self._source_topic = source_topic
        self._tenants: dict[str, _Tenant] = {}
        self._recovered_seen: dict[str, list[SeenRecord]] | None = None

    def forget(self) -> None:
        """Drop every cached tenant (after a rebalance or a failed write): state is read again."""
        self._tenants.clear()
        self._recovered_seen = None

    def process(self, partition: int, records: Sequence[LogRecord]) -> ProcessorOutput:
        output = ProcessorOutput()
        touched: dict[str, _Tenant] = {}
        new_seen: dict[str, list[SeenRecord]] = {}
        for record in records:
            assert record.partition == partition, f"record of partition {record.partition} in batch of {partition}"
            try:
                event = self._decode(record)
                tenant = self._tenant(event.tenant_id)
            except InvalidEvent as error:
                output.dead_letters.append(self._dead_letter(record, error.reason))
                continue
            if record.offset <= tenant.applied_offset:
                output.duplicate_events += 1
                continue
            if isinstance(event, UsageRecorded) and not tenant.account.blocks:
                output.dead_letters.append(self._dead_letter(record, f"unknown tenant {event.tenant_id}"))
                self._forget_if_empty(event.tenant_id, tenant)
                continue
            tenant.index.current_offset = record.offset
            try:
                entries = tenant.account.apply(event, tenant.index)
            except InvalidEvent as error:
                output.dead_letters.append(self._dead_letter(record, error.reason))
                continue
            tenant.applied_offset = record.offset
            tenant.stream_time = max(tenant.stream_time, record.timestamp_ms, _usage_time(event))
            touched[event.tenant_id] = tenant
            if not entries and isinstance(event, UsageRecorded):
                output.duplicate_events += 1
                continue
            output.applied_events += 1
            if isinstance(event, UsageRecorded):
                new_seen.setdefault(event.tenant_id, []).append(
                    SeenRecord(event.event_id, record.offset, event.occurred_at, event.amount)
                )
            output.entries.extend(_entry_records(entries))
        for tenant in touched.values():
            output.entries.extend(_entry_records(tenant.account.advance_to(tenant.stream_time)))
            output.balances.append(self._balance_record(tenant))
        output.state_writes.extend(
            (seen_batch_key(tenant_id, seen[0].offset), _seen_batch_codec[0].encode(seen))
            for tenant_id, seen in new_seen.items()
        )
        output.state_writes.extend((account_key(t), self._account_record(tenant)) for t, tenant in touched.items())
        return output

    def advance(self, tenant_ids: Sequence[str], now_ms: int) -> ProcessorOutput:
        """Publish the expiries that wall-clock time has passed for quiet tenants."""
        output = ProcessorOutput()
        for tenant_id in tenant_ids:
            tenant = self._tenant(tenant_id)
            entries = tenant.account.advance_to(now_ms)
            if not entries:
                continue
            tenant.stream_time = max(tenant.stream_time, now_ms)
            output.entries.extend(_entry_records(entries))
            output.balances.append(self._balance_record(tenant))
            output.state_writes.append((account_key(tenant_id), self._account_record(tenant)))
        return output

    def known_tenants(self) -> list[str]:
        return [key[len(ACCOUNT_KEY_PREFIX):].decode() for key, _ in self._state.items_with_prefix(ACCOUNT_KEY_PREFIX)]

    def expire_quiet(
        self, now_ms: int, partitions: int, owned: Container[int] | None = None
    ) -> list[tuple[int, ProcessorOutput]]:
        """`advance` every known tenant to `now_ms`, grouped by the source partition that owns it (one pass
        over the state; only the `owned` partitions when given); the partitions that published something."""
        grouped: dict[int, list[str]] = {}
        for tenant_id in self.known_tenants():
            grouped.setdefault(partition_for_key(tenant_id.encode(), partitions), []).append(tenant_id)
        swept = []
        for partition, tenants in grouped.items():
            if owned is None or partition in owned:
                output = self.advance(tenants, now_ms)
                if output.entries or output.state_writes:
                    swept.append((partition, output))
        return swept

    def tenant_account(self, tenant_id: str) -> tuple[Account, InMemoryUsageIndex]:
        tenant = self._tenant(tenant_id)
        return tenant.account, tenant.index.index

    # -------------------------------------------------------------------------------------- helpers

    def _decode(self, record: LogRecord):
        if record.value is None:
            raise InvalidEvent("empty record (no value)")
        event = decode_input_event(record.value)
        if record.key is not None and record.key != event.tenant_id.encode():
            raise InvalidEvent(f"record key {record.key!r} does not match tenant_id {event.tenant_id!r}")
        return event

    def _tenant(self, tenant_id: str) -> _Tenant:
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            tenant = self._tenants[tenant_id] = self._load_tenant(tenant_id)
        return tenant

    def _forget_if_empty(self, tenant_id: str, tenant: _Tenant) -> None:
        """Drop a tenant that has never applied anything from the cache, so that records naming tenants
        that do not exist (dead-lettered) cannot grow it."""
        if tenant.applied_offset < 0:
            del self._tenants[tenant_id]

    def _load_tenant(self, tenant_id: str) -> _Tenant:
        stored = self._state.get(account_key(tenant_id))
        if stored is None:
            account, applied_offset, stream_time = Account(tenant_id), -1, -1
        else:
            record = _account_record_codec[1].decode(stored)
            account = account_from_bytes(record.snapshot)
            applied_offset, stream_time = record.applied_offset, record.stream_time
        index = _OffsetAwareIndex()
        for seen in self._seen_of(tenant_id):
            if seen.offset <= applied_offset:  # its effect is in the snapshot; later ones get redelivered
                index.current_offset = seen.offset
                index.record(seen.event_id, seen.occurred_at, seen.amount)
        return _Tenant(account, index, applied_offset, stream_time)

    def _seen_of(self, tenant_id: str) -> list[SeenRecord]:
        """The stored seen ids of a tenant. One pass over the state groups them all, once per recovery."""
        if self._recovered_seen is None:
            decode_seen = _seen_batch_codec[1].decode
            grouped: dict[str, list[SeenRecord]] = {}
            for key, value in self._state.items_with_prefix(SEEN_KEY_PREFIX):
                tenant = key[len(SEEN_KEY_PREFIX):].decode().partition("/")[0]
                grouped.setdefault(tenant, []).extend(decode_seen(value))
            self._recovered_seen = grouped
        return self._recovered_seen.pop(tenant_id, [])

    def _balance_record(self, tenant: _Tenant) -> OutputRecord:
        account = tenant.account
        as_of = max(tenant.stream_time, 0)
        index = tenant.index.index
        blocks = account.blocks_at(as_of, index)  # the blocks balance_at(as_of) sums, with their remainders
        record = BalanceRecord(
            tenant_id=account.tenant_id,
            balance=sum(block.remaining for block in blocks),
            overage=account.overage_total,
            as_of=as_of,
            applied_offset=tenant.applied_offset,
            expiring=tuple((b.expires_at, b.remaining) for b in blocks if b.expires_at is not None and b.remaining),
        )
        return OutputRecord(account.tenant_id.encode(), _json.encode(record))

    def _account_record(self, tenant: _Tenant) -> bytes:
        record = AccountRecord(tenant.applied_offset, tenant.stream_time, account_to_bytes(tenant.account))
        return _account_record_codec[0].encode(record)

    def _dead_letter(self, record: LogRecord, reason: str) -> OutputRecord:
        log.warning("dead letter %s[%d]@%d: %s", self._source_topic, record.partition, record.offset, reason)
        letter = DeadLetter(
            reason=reason,
            source_topic=self._source_topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp_ms,
            key=record.key,
            value=record.value,
        )
        return OutputRecord(record.key or b"", _json.encode(letter))


def _usage_time(event) -> int:
    """Usage moves stream time (workers stamp it now); grants and voids may be dated ahead and do not."""
    return event.occurred_at if isinstance(event, UsageRecorded) else -1


def _entry_records(entries: list[Entry]) -> Iterator[OutputRecord]:
    for entry in entries:
        yield OutputRecord(entry.tenant_id.encode(), encode_entry(entry))
