"""The ledger processor: source records in, entries, balances, dead letters and state writes out.

It owns no transport. The Kafka batch engine (streams.batch_processor), the faust agent
(streams.faust_app), the embedded log's driver and the audit replay all call
`LedgerProcessor.process(partition, records)` (or `advance` for a wall-clock sweep) and then, in this
order (the state-first outbox):
  1. persist `output.state_writes` in order, on the owning partition's changelog, and wait for the
     acks: the batch's seen usage ids per tenant first, then ONE record per touched tenant holding its
     account snapshot, its stream time, the highest source offset folded in, and the batch's outputs
     for that tenant (entries, dead letters, balance): its outbox;
  2. publish `output.entries`, `output.balances` and `output.dead_letters` and wait for the acks;
  3. (the Kafka engines) commit the source offsets.

Why state first. Entries are derived from the state, the records AND the batch boundaries and sweep
times (a late usage folded before or after an expiry was published yields different entries). If
outputs went out first, a crash before the state write refolds a different batch after the restart and
publishes different contents under the same entry id (finance would integrate both). Here nothing is
published that is not already durable together with the state that produced it: the account record is
the commit point of a tenant's batch. A crash before it leaves nothing published that this state does
not explain; a crash after it republishes the stored outbox byte for byte, never recomputed: every time
a tenant is loaded from durable state (a restart, a takeover, a rebalance, a failed write) its stored
outbox goes out again ahead of anything new for it, and is carried into the next account record of that
tenant so that a crash right after that write cannot lose it. Consumers keep one record per entry id;
repeats are byte-identical. Kafka transactions would need faust's exactly-once mode (known to duplicate
and to crash on rebalances: faust-streaming #517, #323, #440), a transaction round trip per batch, and
read-committed finance consumers; the outbox works the same for the batch engine, the faust table and
the embedded Postgres driver (which also commits outputs, state and offsets in one transaction and so
does not need the outbox: `outbox=False`).

Sweeps are part of the state: `advance(now)` moves a tenant's stream time only when something is
published (an end passed, or a block became effective: the balance changed), and persists that stream
time in the same account record, so a recovered processor never re-decides what an earlier sweep
published.

A crash during 1 leaves a prefix of the writes: a seen-id written without its account record has a
source offset above the record's `applied_offset` and is ignored (the record is redelivered and
applied again); an account record is never applied twice, because it carries the highest source offset
it includes. Dead letters of a tenant's records ride in its outbox too; a record that names no tenant
(undecodable) is dead-lettered again whenever it is redelivered.

The hash chain (`ledger.chain`): a tenant's new entries are linked onto its chain in `_emit`, and a
signed checkpoint taken when one is due (`streams.audit_checkpoints`, stream time only); both ride in the
outbox and the chain's head in the same account record, so a republication is the identical chain.

Usage for a tenant without a single grant on this partition is dead-lettered ("unknown tenant"), not
folded as overage: admission needs credit, so legitimate usage always follows its tenant's first grant
on the same partition (same key, same partition), and anything else was not admitted by a gateway.

Dedupe, two ways: a record redelivered after a crash has an offset at or below the tenant's
`applied_offset`; the same event produced twice (a producer resend) has another offset, and its event
id is in the seen index with the first offset.

The usage index seam: a tenant's `_OffsetAwareIndex` (below) is the only place the processor touches
its seen ids and per-millisecond usage. Two implementations: with `usage_indexes=None` the processor
rebuilds an in-memory one from the stored seen batches when it loads a tenant (the faust engine, whose
state is its faust table, the embedded driver, whose state is Postgres, the audit replay and the tests);
with `usage_indexes` (the batch engine: `streams.state_store.RocksState.usage_indexes`) each tenant's
index is a view of an on-disk index, materialised from the same seen batches as they are written, with
a bounded cache in front, so nothing that grows with usage stays in RAM.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import msgspec

from ledger.account import Account
from ledger.alerts import encode_alert
from ledger.chain import ChainState
from ledger.codec import decode_input_event
from ledger.entries import Entry, encode_entry
from ledger.events import RULE_EVENT_TYPES, InvalidEvent, UsageRecorded
from ledger.pending import pending_grants
from ledger.rules import ExpiringBlock, RulesState, TenantRules
from ledger.scoped import scoped_credit
from ledger.snapshot import account_from_bytes, account_to_bytes
from ledger.usage_index import NO_MODEL, InMemoryUsageIndex, UsageIndex, UsageSummary
from streams.audit_checkpoints import CheckpointPolicy
from streams.records import BalanceRecord, DeadLetter, LogRecord, partition_for_key

log = logging.getLogger(__name__)

ACCOUNT_KEY_PREFIX = b"a/"
SEEN_KEY_PREFIX = b"s/"
# An outbox above this many bytes is stored zlib-compressed (JSON entries shrink several times), so that
# one tenant's batch of a few thousand entries stays well inside a broker's record size limit (1 MiB).
# Below it, stored as is: compressing costs ~5 us of CPU per entry, more than the fold of its usage event.
OUTBOX_COMPRESS_BYTES_MIN = 256 * 1024


class OutputRecord(NamedTuple):  # a tuple: one per entry, built in the fold's hot path
    key: bytes
    value: bytes


class Outbox(msgspec.Struct, frozen=True, array_like=True):
    """What one tenant's batch published, stored with the state that produced it: republished byte for
    byte after a crash, never recomputed. Entries and the balance are keyed by the tenant id."""

    entries: list[bytes]
    dead_letters: list[tuple[bytes, bytes]]  # (key, value)
    balance: bytes | None
    checkpoints: list[bytes] = []  # signed checkpoint records (ledger.checkpoints), keyed by the tenant id
    alerts: list[bytes] = []  # alerts its rules fired (ledger.alerts), keyed by the tenant id


class AccountRecord(msgspec.Struct, frozen=True, array_like=True):
    """An account snapshot with the highest source offset it includes, its stream time (sweeps
    included), its outbox (msgpack of `Outbox`, zlib-compressed when `outbox_compressed`) and its hash
    chain after that outbox (`ledger.chain`; None: no entry yet), and its alert and top-up rules with their
    crossing state (`ledger.rules`; None: the tenant never had a rule)."""

    applied_offset: int
    stream_time: int
    snapshot: bytes
    outbox: bytes = b""
    outbox_compressed: bool = False
    chain: ChainState | None = None
    rules: RulesState | None = None


class SeenRecord(msgspec.Struct, frozen=True, array_like=True):
    """A usage event applied at `offset`. Stored in batches: one state write per tenant per batch."""

    event_id: str
    offset: int
    occurred_at: int
    amount: int
    model: str = NO_MODEL  # its model (for credits scoped to models); NO_MODEL in batches written before


@dataclass
class ProcessorOutput:
    entries: list[OutputRecord] = field(default_factory=list)
    balances: list[OutputRecord] = field(default_factory=list)
    dead_letters: list[OutputRecord] = field(default_factory=list)
    checkpoints: list[OutputRecord] = field(default_factory=list)
    alerts: list[OutputRecord] = field(default_factory=list)  # ledger.alerts, keyed by the tenant id
    state_writes: list[tuple[bytes, bytes]] = field(default_factory=list)
    applied_events: int = 0
    duplicate_events: int = 0
    republished_outboxes: int = 0  # stored outboxes sent again (a tenant loaded from durable state)

    def __bool__(self) -> bool:
        return bool(
            self.entries
            or self.balances
            or self.dead_letters
            or self.checkpoints
            or self.alerts
            or self.state_writes
        )


class StateReader(Protocol):
    """Read access to the durable state of one processor (a faust table, a Postgres table, a dict)."""

    def get(self, key: bytes) -> bytes | None: ...

    def items_with_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]: ...


class TenantUsageIndex(Protocol):
    """One tenant's usage index as the processor drives it (`_OffsetAwareIndex`, or an on-disk view):
    `current_offset` is set before each `Account.apply`; an event id first applied at another offset is
    a duplicate; `index` answers the queries (balances, `tenant_account`)."""

    current_offset: int

    def seen(self, event_id: str) -> bool: ...

    def record(self, event_id: str, occurred_at: int, amount: int, model: str) -> None: ...

    def usage_between(self, start: int, end: int) -> UsageSummary: ...

    def usage_by_model_between(self, start: int, end: int) -> dict[str, int]: ...

    @property
    def index(self) -> UsageIndex: ...


class UsageIndexes(Protocol):
    """Where the processor gets its tenants' usage indexes when they do not live in RAM: derived from the
    seen batches of the state it reads (`streams.state_store.DiskUsageIndexes`)."""

    def open(self, tenant_id: str, applied_offset: int) -> TenantUsageIndex:
        """The index of a tenant whose account snapshot includes source offsets up to `applied_offset`."""

    def forget(self) -> None:
        """The processor dropped its cached tenants: every open view is closed."""


_json = msgspec.json.Encoder()
_account_record_codec = (msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(AccountRecord))
_seen_batch_codec = (msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(list[SeenRecord]))
_outbox_codec = (msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(Outbox))


def account_key(tenant_id: str) -> bytes:
    return ACCOUNT_KEY_PREFIX + tenant_id.encode()


def seen_batch_key(tenant_id: str, first_offset: int) -> bytes:
    """The key of a tenant's usage ids applied in one batch, named by the batch's first source offset."""
    return SEEN_KEY_PREFIX + tenant_id.encode() + b"/" + b"%020d" % first_offset


def decode_account_record(value: bytes) -> AccountRecord:
    return _account_record_codec[1].decode(value)


def stored_outbox(record: AccountRecord) -> Outbox | None:
    if not record.outbox:
        return None
    data = zlib.decompress(record.outbox) if record.outbox_compressed else record.outbox
    return _outbox_codec[1].decode(data)


class _OffsetAwareIndex:
    """The usage index of one tenant as the processor sees it (the seam where an on-disk index plugs
    in). An event id is a duplicate when it was first applied at another source offset; at the same
    offset it is this record, redelivered."""

    __slots__ = ("index", "current_offset", "first_offsets")

    def __init__(self) -> None:
        self.index = InMemoryUsageIndex()
        self.first_offsets: dict[str, int] = {}
        self.current_offset = -1

    def seen(self, event_id: str) -> bool:
        first = self.first_offsets.get(event_id)
        return first is not None and first != self.current_offset

    def record(self, event_id: str, occurred_at: int, amount: int, model: str) -> None:
        self.first_offsets[event_id] = self.current_offset
        self.index.record(event_id, occurred_at, amount, model)

    def usage_between(self, start: int, end: int) -> UsageSummary:
        return self.index.usage_between(start, end)

    def usage_by_model_between(self, start: int, end: int) -> dict[str, int]:
        return self.index.usage_by_model_between(start, end)


@dataclass
class _Tenant:
    account: Account
    index: TenantUsageIndex
    applied_offset: int
    stream_time: int
    stored_outbox: Outbox | None = None  # loaded from durable state, not yet sent again by this process
    chain: ChainState = field(default_factory=ChainState)  # its hash chain, entries of this call included
    rules: TenantRules | None = None  # its alert and top-up rules; None: it never had one (not evaluated)


@dataclass
class _TenantBatch:
    """One tenant's share of one `process` or `advance` call."""

    carried: Outbox | None  # its stored outbox, sent again first and kept in the next outbox
    watermark: int  # its account's watermark when the batch began (on the hash chain's links)
    entries: list[bytes] = field(default_factory=list)
    dead_letters: list[tuple[bytes, bytes]] = field(default_factory=list)
    alerts: list[bytes] = field(default_factory=list)
    touched: bool = False  # its account changed: one account record is written


class LedgerProcessor:
    """Folds ledger events into per-tenant accounts. One instance per process; not thread-safe.

    `outbox=False` (the embedded driver: outputs, state and offsets in one transaction) stores no
    outbox and sends nothing again on load. `usage_indexes` (the batch engine's on-disk store): the
    tenants' usage indexes come from there instead of being rebuilt in RAM from the seen batches."""

    def __init__(
        self,
        state: StateReader,
        *,
        source_topic: str,
        outbox: bool = True,
        usage_indexes: UsageIndexes | None = None,
        checkpoints: CheckpointPolicy | None = None,
    ) -> None:
        self._state = state
        # the chain's checkpoint intervals and signing key (settings TOLLGATE_AUDIT_*)
        self.checkpoints = checkpoints or CheckpointPolicy.from_settings()
        self._source_topic = source_topic
        self._outbox = outbox
        self._usage_indexes = usage_indexes
        self._tenants: dict[str, _Tenant] = {}
        self._recovered_seen: dict[str, list[SeenRecord]] | None = None

    def forget(self, partitions: Container[int] | None = None, partition_count: int = 0) -> None:
        """Drop cached tenants (all of them, or those of `partitions`) after a rebalance or a failed
        write: they are read again from durable state, and their stored outboxes sent again."""
        if partitions is None:
            self._tenants.clear()
        else:
            assert partition_count > 0, "forget(partitions) needs the partition count"
            for tenant_id in [
                t for t in self._tenants if partition_for_key(t.encode(), partition_count) in partitions
            ]:
                del self._tenants[tenant_id]
        self._recovered_seen = None
        if self._usage_indexes is not None and partitions is None:
            self._usage_indexes.forget()

    def process(self, partition: int, records: Sequence[LogRecord]) -> ProcessorOutput:
        output = ProcessorOutput()
        batches: dict[str, _TenantBatch] = {}
        new_seen: dict[str, list[SeenRecord]] = {}
        # The hot path (one pass per record, tens of thousands a second): locals, no helper calls for what
        # nearly every record does.
        tenants, decode = self._tenants, self._decode
        for record in records:
            assert record.partition == partition, (
                f"record of partition {record.partition} in batch of {partition}"
            )
            try:
                event = decode(record)
            except InvalidEvent as error:
                output.dead_letters.append(self._dead_letter(record, error.reason))
                continue
            tenant_id = event.tenant_id
            tenant = tenants.get(tenant_id) or self._tenant(tenant_id)
            batch = batches.get(tenant_id) or batches.setdefault(tenant_id, self._batch_of(tenant))
            offset = record.offset
            if offset <= tenant.applied_offset:
                output.duplicate_events += 1
                continue
            usage = type(event) is UsageRecorded
            if usage and not tenant.account.blocks:
                self._refuse_unknown_tenant(record, tenant_id, tenant, batch)
                continue
            tenant.index.current_offset = offset
            try:
                entries = tenant.account.apply(event, tenant.index)
            except InvalidEvent as error:
                letter = self._dead_letter(record, error.reason)
                batch.dead_letters.append((letter.key, letter.value))
                continue
            tenant.applied_offset = offset
            # Usage moves stream time (workers stamp it now); grants and voids may be dated ahead and do not.
            moved_to = event.occurred_at if usage else -1
            tenant.stream_time = max(tenant.stream_time, record.timestamp_ms, moved_to)
            batch.touched = True
            if tenant.rules is not None or (not usage and type(event) in RULE_EVENT_TYPES):
                self._rules_step(tenant, event, batch)
            if usage:
                if not entries:
                    output.duplicate_events += 1
                    continue
                seen = new_seen.get(tenant_id)
                if seen is None:
                    seen = new_seen[tenant_id] = []
                seen.append(SeenRecord(event.event_id, offset, event.occurred_at, event.amount, event.model))
            output.applied_events += 1
            batch.entries.extend([encode_entry(entry) for entry in entries])
        output.state_writes.extend(
            (seen_batch_key(tenant_id, seen[0].offset), _seen_batch_codec[0].encode(seen))
            for tenant_id, seen in new_seen.items()
        )
        for tenant_id, batch in batches.items():
            if batch.touched:
                tenant = self._tenants[tenant_id]
                batch.entries.extend(_encoded(tenant.account.advance_to(tenant.stream_time)))
            self._emit(tenant_id, batch, output)
        return output

    def advance(self, tenant_ids: Sequence[str], now_ms: int) -> ProcessorOutput:
        """A wall-clock sweep of quiet tenants: publish the ends `now_ms` has passed, and a balance for
        a tenant whose balance `now_ms` changed (a block became effective or ended). The stream time it
        moves is persisted with the account; a tenant with nothing to publish is left as it was."""
        output = ProcessorOutput()
        for tenant_id in tenant_ids:
            tenant = self._tenant(tenant_id)
            batch = self._batch_of(tenant)
            if _sweep_changes(tenant, now_ms):
                tenant.stream_time = now_ms
                batch.entries.extend(_encoded(tenant.account.advance_to(now_ms)))
                batch.touched = True
            if tenant.rules is not None and now_ms >= tenant.stream_time:
                self._sweep_rules(tenant, batch, now_ms)
            self._emit(tenant_id, batch, output)
        return output

    def known_tenants(self) -> list[str]:
        return [
            key[len(ACCOUNT_KEY_PREFIX) :].decode()
            for key, _ in self._state.items_with_prefix(ACCOUNT_KEY_PREFIX)
        ]

    def _grouped_tenants(self, partitions: int, owned: Container[int] | None) -> dict[int, list[str]]:
        grouped: dict[int, list[str]] = {}
        for tenant_id in self.known_tenants():
            partition = partition_for_key(tenant_id.encode(), partitions)
            if owned is None or partition in owned:
                grouped.setdefault(partition, []).append(tenant_id)
        return grouped

    def expire_quiet(
        self, now_ms: int, partitions: int, owned: Container[int] | None = None
    ) -> list[tuple[int, ProcessorOutput]]:
        """`advance` every known tenant to `now_ms`, grouped by the source partition that owns it (one pass
        over the state; only the `owned` partitions when given); the partitions that published something."""
        swept = []
        for partition, tenants in self._grouped_tenants(partitions, owned).items():
            output = self.advance(tenants, now_ms)
            if output:
                swept.append((partition, output))
        return swept

    def recover(self, partitions: int, owned: Container[int]) -> list[tuple[int, ProcessorOutput]]:
        """After state was read back (a start, a takeover): load every tenant of the `owned` partitions
        and send their stored outboxes again, before anything new is folded."""
        recovered = []
        for partition, tenants in self._grouped_tenants(partitions, owned).items():
            output = ProcessorOutput()
            for tenant_id in tenants:
                self._emit(tenant_id, self._batch_of(self._tenant(tenant_id)), output)
            if output:
                recovered.append((partition, output))
        return recovered

    def tenant_account(self, tenant_id: str) -> tuple[Account, UsageIndex]:
        tenant = self._tenant(tenant_id)
        return tenant.account, tenant.index.index

    def tenant_rules(self, tenant_id: str) -> TenantRules | None:
        """A tenant's alert and top-up rules with their crossing state (None: it never had a rule)."""
        return self._tenant(tenant_id).rules

    def tenant_position(self, tenant_id: str) -> tuple[int, int]:
        """(applied source offset, stream time) of a tenant as this processor holds it."""
        tenant = self._tenant(tenant_id)
        return tenant.applied_offset, tenant.stream_time

    def resume_at(self, tenant_id: str, stream_time: int) -> list[Entry]:
        """The audit re-fold (streams.audit_verify): the tenant's next batch began at `stream_time`, which
        batch ends or sweeps that published nothing had reached (a chain link's watermark); its stream
        time and account move there. What that publishes (nothing, when the ledger is what it says)."""
        tenant = self._tenant(tenant_id)
        tenant.stream_time = max(tenant.stream_time, stream_time)
        return tenant.account.advance_to(stream_time)

    # -------------------------------------------------------------------------------------- helpers

    def _batch_of(self, tenant: _Tenant) -> _TenantBatch:
        carried, tenant.stored_outbox = tenant.stored_outbox, None
        return _TenantBatch(carried, tenant.account.watermark)

    def _emit(self, tenant_id: str, batch: _TenantBatch, output: ProcessorOutput) -> None:
        """A tenant's outputs of this call: its carried outbox first, then what is new; and, when its
        account changed, the account record holding both (the commit point of the tenant's batch)."""
        key = tenant_id.encode()
        carried = batch.carried
        new_entries, checkpoints = self._link(tenant_id, batch) if batch.entries else ([], [])
        if carried is not None:
            output.republished_outboxes += 1
            entries = carried.entries + new_entries if new_entries else carried.entries
            dead_letters = carried.dead_letters + batch.dead_letters
            checkpoints = carried.checkpoints + checkpoints if checkpoints else carried.checkpoints
            alerts = carried.alerts + batch.alerts if batch.alerts else carried.alerts
        else:
            entries, dead_letters, alerts = new_entries, batch.dead_letters, batch.alerts
        if batch.touched:
            tenant = self._tenants[tenant_id]
            balance = self._balance_record(tenant)
            outbox = Outbox(entries, dead_letters, balance, checkpoints, alerts) if self._outbox else None
            output.state_writes.append((account_key(tenant_id), self._account_record(tenant, outbox)))
        else:
            balance = carried.balance if carried is not None else None
        output.entries.extend([OutputRecord(key, value) for value in entries])
        output.dead_letters.extend([OutputRecord(k, v) for k, v in dead_letters])
        output.checkpoints.extend([OutputRecord(key, value) for value in checkpoints])
        if alerts:
            output.alerts.extend([OutputRecord(key, value) for value in alerts])
        if balance is not None:
            output.balances.append(OutputRecord(key, balance))

    def _rules_step(self, tenant: _Tenant, event, batch: _TenantBatch) -> None:
        """After an applied event of a tenant with rules (or a rule event): fold a rule event into its rules,
        then evaluate them at its stream time."""
        if type(event) in RULE_EVENT_TYPES:
            if tenant.rules is None:
                tenant.rules = TenantRules(tenant.account.tenant_id)
            tenant.rules.apply(event)
        self._evaluate_rules(tenant, batch, tenant.stream_time)

    def _evaluate_rules(self, tenant: _Tenant, batch: _TenantBatch, at: int) -> bool:
        """Evaluate the tenant's rules on its settled balance at stream time `at`; their alerts join the
        batch (and so its outbox). Whether any fired."""
        rules = tenant.rules
        assert rules is not None, "only a tenant with rules is evaluated"
        blocks = tenant.account.blocks_at(max(at, 0), tenant.index.index)
        expiring = [
            ExpiringBlock(b.grant_id, b.expires_at, b.remaining)
            for b in blocks
            if b.expires_at is not None and b.remaining > 0
        ]
        balance = sum(b.remaining for b in blocks)
        alerts = rules.evaluate(balance, sum(b.amount for b in blocks), expiring, at)
        if not alerts:
            return False
        batch.alerts.extend([encode_alert(alert) for alert in alerts])
        batch.touched = True
        return True

    def _sweep_rules(self, tenant: _Tenant, batch: _TenantBatch, now_ms: int) -> None:
        """A sweep evaluates the rules at `now_ms` (a grant comes within an expiry window with time alone);
        when one fires, the tenant's stream time moves there as a sweep's does, persisted with the alert."""
        if self._evaluate_rules(tenant, batch, now_ms) and now_ms > tenant.stream_time:
            tenant.stream_time = now_ms
            batch.entries.extend(_encoded(tenant.account.advance_to(now_ms)))

    def _link(self, tenant_id: str, batch: _TenantBatch) -> tuple[list[bytes], list[bytes]]:
        """A tenant's new entries linked onto its hash chain, and the checkpoints they completed."""
        tenant = self._tenants[tenant_id]
        position = (tenant.applied_offset, tenant.stream_time, batch.watermark)
        return self.checkpoints.link(tenant.chain, tenant_id, position, batch.entries)

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

    def _refuse_unknown_tenant(
        self, record: LogRecord, tenant_id: str, tenant: _Tenant, batch: _TenantBatch
    ) -> None:
        letter = self._dead_letter(record, f"unknown tenant {tenant_id}")
        batch.dead_letters.append((letter.key, letter.value))
        self._forget_if_empty(tenant_id, tenant)

    def _forget_if_empty(self, tenant_id: str, tenant: _Tenant) -> None:
        """Drop a tenant that has never applied anything from the cache, so that records naming tenants
        that do not exist (dead-lettered) cannot grow it. (A tenant the re-fold moved, `resume_at`, stays.)"""
        if tenant.applied_offset < 0 and tenant.stream_time < 0 and self._tenants.get(tenant_id) is tenant:
            del self._tenants[tenant_id]

    def _load_tenant(self, tenant_id: str) -> _Tenant:
        stored = self._state.get(account_key(tenant_id))
        outbox = None
        rules = None
        if stored is None:
            account, applied_offset, stream_time, chain = Account(tenant_id), -1, -1, ChainState()
        else:
            record = decode_account_record(stored)
            account = account_from_bytes(record.snapshot)
            applied_offset, stream_time = record.applied_offset, record.stream_time
            outbox = stored_outbox(record) if self._outbox else None
            chain = record.chain or ChainState()
            rules = TenantRules(tenant_id, record.rules) if record.rules is not None else None
        if self._usage_indexes is not None:
            return _Tenant(
                account,
                self._usage_indexes.open(tenant_id, applied_offset),
                applied_offset,
                stream_time,
                outbox,
                chain,
                rules,
            )
        index = _OffsetAwareIndex()
        for seen in self._seen_of(tenant_id):
            # Its effect is in the snapshot when at or below the applied offset (later ones: a crash between
            # the seen write and the account record; they get redelivered). A batch written twice (a crash,
            # then a refold of other boundaries) stores the same event at the same offset twice.
            if seen.offset <= applied_offset and seen.event_id not in index.first_offsets:
                index.current_offset = seen.offset
                index.record(seen.event_id, seen.occurred_at, seen.amount, seen.model)
        return _Tenant(account, index, applied_offset, stream_time, outbox, chain, rules)

    def _seen_of(self, tenant_id: str) -> list[SeenRecord]:
        """The stored seen ids of a tenant. One pass over the state groups them all, once per recovery."""
        if self._recovered_seen is None:
            decode_seen = _seen_batch_codec[1].decode
            grouped: dict[str, list[SeenRecord]] = {}
            for key, value in self._state.items_with_prefix(SEEN_KEY_PREFIX):
                tenant = key[len(SEEN_KEY_PREFIX) :].decode().partition("/")[0]
                grouped.setdefault(tenant, []).extend(decode_seen(value))
            self._recovered_seen = grouped
        return self._recovered_seen.pop(tenant_id, [])

    def _balance_record(self, tenant: _Tenant) -> bytes:
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
            expiring=tuple(
                (b.expires_at, b.remaining) for b in blocks if b.expires_at is not None and b.remaining
            ),
            pending=pending_grants(account.blocks.values(), as_of),  # grants not yet effective
            scoped=scoped_credit(blocks) if account.has_scopes else (),  # credit only some models spend
        )
        return _json.encode(record)

    def _account_record(self, tenant: _Tenant, outbox: Outbox | None) -> bytes:
        packed, compressed = b"", False
        if outbox is not None:
            packed = _outbox_codec[0].encode(outbox)
            if len(packed) >= OUTBOX_COMPRESS_BYTES_MIN:
                packed, compressed = zlib.compress(packed, 1), True
        record = AccountRecord(
            tenant.applied_offset,
            tenant.stream_time,
            account_to_bytes(tenant.account),
            packed,
            compressed,
            tenant.chain if tenant.chain.sequence else None,
            tenant.rules.state if tenant.rules is not None else None,
        )
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


def _sweep_changes(tenant: _Tenant, now_ms: int) -> bool:
    """Whether sweeping to `now_ms` publishes anything: an end not yet published is passed, or a block's
    effective_at or end lies in (stream time, now_ms], so the balance at now_ms differs."""
    since = tenant.stream_time
    if now_ms <= since:
        return False
    for block in tenant.account.blocks.values():
        if block.reported_end_kind is None and block.end <= now_ms:
            return True
        if since < block.effective_at <= now_ms:
            return True
    return False


def _encoded(entries: list[Entry]) -> list[bytes]:
    return [encode_entry(entry) for entry in entries]
