"""`tollgate audit verify`: every link, Merkle root and signature of the entries' hash chains, in Postgres
and on the topics, then a re-fold of `ledger.events` that must reproduce the entries byte for byte.

The checks are pure functions over one tenant's rows (`check_links`, `check_checkpoints`, `compare`,
`refold`); `verify` loads them from Postgres and from the log and names the first divergence of each
tenant: (tenant, sequence, field). A field is a column or JSON member that differs (`amount`,
`merkle_root`, ...), or one of: `hash` (the bytes do not hash to the link), `previous` (a broken link),
`missing` (a sequence absent: a deleted row or record), `order` (rows out of the chain's order),
`signature`, `number` (a checkpoint absent), `unpublished` (the re-fold publishes an entry the topic lacks).

Why the re-fold can be exact: every entry's link carries the source offset and stream time its tenant's
fold stood at when the entry was published (`ledger.chain`), so the re-fold cuts the tenant's records
into the same batches and runs the same sweeps. A tenant's fold depends only on its own records.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ledger.chain import (
    ADMIN_CHAIN,
    GENESIS_HASH,
    BrokenRecord,
    entry_hash,
    merkle_root,
    split_record,
    split_signed,
)
from ledger.entries import decode_entry, encode_entry
from ledger.events import InvalidEvent
from storage.audit import AdminAuditRecord, LedgerCheckpoint
from storage.projections import LedgerEntry
from streams.audit_checkpoints import CheckpointPolicy, key_id
from streams.log import EventLog
from streams.processor import LedgerProcessor, OutputRecord
from streams.records import LogRecord, partition_for_key

READ_BATCH_MAX = 5_000
REFOLD_CHECKPOINT_ENTRIES = 2**40  # the re-fold compares entries; checkpoints are checked on their own


@dataclass(frozen=True)
class Divergence:
    tenant_id: str
    sequence: int  # the entry's chain sequence, or the checkpoint's number (field "checkpoint ...")
    field: str
    where: str  # postgres, topic, checkpoints (postgres), checkpoints (topic), refold
    detail: str = ""

    def __str__(self) -> str:
        where = f"{self.where}: tenant {self.tenant_id}, sequence {self.sequence}"
        return f"{where}, field {self.field} {self.detail}".rstrip()


@dataclass(frozen=True)
class EntryRow:
    """One entry as a source holds it: its bytes and, from Postgres, the columns beside them."""

    record: bytes
    columns: dict | None = None


def first_difference(expected: bytes, got: bytes) -> str:
    """The first JSON member (the chain link's members too) in which two records differ."""
    try:
        left, right = msgspec.json.decode(expected), msgspec.json.decode(got)
    except msgspec.DecodeError:
        return "record"
    if isinstance(left, dict) and isinstance(right, dict):
        for name in [*left, *(name for name in right if name not in left)]:  # in the record's order
            if left.get(name) != right.get(name):
                inner = left.get(name), right.get(name)
                if name == "chain" and isinstance(inner[0], dict) and isinstance(inner[1], dict):
                    return "chain." + first_difference(
                        msgspec.json.encode(inner[0]), msgspec.json.encode(inner[1])
                    )
                return name
    return "bytes"


def _column_difference(columns: dict, record: bytes) -> str | None:
    """The first projected column that does not say what the record says (a row edited in place)."""
    try:
        entry = decode_entry(record)
    except InvalidEvent:
        return "record"
    payload = msgspec.json.decode(msgspec.json.encode(entry))  # as the projector stored it, in JSON types
    expected = {
        "entry_id": getattr(entry, "entry_id", None) or payload.get("event_id"),
        "tenant_id": entry.tenant_id,
        "entry_type": payload["type"],
        "payload": payload,
    }
    if columns.get("amount") is not None or "amount" in payload or "delta" in payload:
        expected["amount"] = payload.get("amount", payload.get("delta", payload.get("overage_delta")))
    for name, value in expected.items():
        if name in columns and columns[name] != value:
            if name == "payload" and isinstance(columns[name], dict):
                return next(
                    (
                        k
                        for k in sorted(set(value) | set(columns[name]))
                        if value.get(k) != columns[name].get(k)
                    ),
                    name,
                )
            return name
    return None


def _later_has(rows: list[EntryRow], sequence: int) -> bool:
    """Whether a row after position `sequence` holds entry `sequence` (rows out of order, not a gap)."""
    for row in rows[sequence:]:
        try:
            if split_record(row.record)[1].sequence == sequence:
                return True
        except BrokenRecord:
            continue
    return False


def check_links(
    tenant_id: str, rows: list[EntryRow], where: str
) -> tuple[dict[int, bytes], Divergence | None]:
    """Walk a tenant's entries in the source's order: sequences 1, 2, ...; each hash recomputed from the
    bytes; each link to the previous hash; a row's columns against its bytes. Returns the hashes up to the
    first divergence, and that divergence."""
    hashes: dict[int, bytes] = {}
    previous = GENESIS_HASH
    for position, row in enumerate(rows, start=1):
        try:
            body, link = split_record(row.record)
        except BrokenRecord as error:
            return hashes, Divergence(tenant_id, position, "chain", where, str(error))
        if link.sequence != position:
            field = "order" if link.sequence < position or _later_has(rows, position) else "missing"
            return hashes, Divergence(tenant_id, position, field, where, f"(found sequence {link.sequence})")
        own = bytes.fromhex(link.hash)
        if entry_hash(previous, link.sequence, link.position, body) != own:
            return hashes, Divergence(tenant_id, position, "hash", where, "(the bytes were changed)")
        if bytes.fromhex(link.previous) != previous:
            return hashes, Divergence(tenant_id, position, "previous", where)
        if row.columns is not None:
            if (
                row.columns.get("chain_sequence") != link.sequence
                or row.columns.get("chain_hash") != link.hash
            ):
                return hashes, Divergence(tenant_id, position, "chain_sequence", where)
            field = _column_difference(row.columns, row.record)
            if field is not None:
                return hashes, Divergence(
                    tenant_id, position, field, where, "(the column differs from the entry)"
                )
        hashes[position] = own
        previous = own
    return hashes, None


def check_checkpoints(
    tenant_id: str,
    records: list[tuple[bytes, dict | None]],
    hashes: dict[int, bytes],
    public_key: Ed25519PublicKey,
    where: str,
) -> Divergence | None:
    """A tenant's checkpoints in number order: numbered 1, 2, ...; each following the last; signed by the
    key; its columns (Postgres) as signed; its head and Merkle root those of the entries it covers."""
    expected_first = 1
    for number, (record, columns) in enumerate(records, start=1):
        try:
            body, checkpoint, signature = split_signed(record)
        except BrokenRecord as error:
            return Divergence(tenant_id, number, "checkpoint record", where, str(error))
        if checkpoint.number != number:
            return Divergence(tenant_id, number, "checkpoint number", where, f"(found {checkpoint.number})")
        try:
            public_key.verify(signature, body)
        except InvalidSignature:
            return Divergence(tenant_id, number, "checkpoint signature", where)
        signed = msgspec.to_builtins(checkpoint)
        for name, value in (columns or {}).items():
            if signed.get(name if name != "stream_time_ms" else "stream_time", value) != value:
                return Divergence(
                    tenant_id,
                    number,
                    f"checkpoint {name}",
                    where,
                    "(the column differs from the signed record)",
                )
        if checkpoint.first_sequence != expected_first:
            return Divergence(tenant_id, number, "checkpoint first_sequence", where)
        span = range(checkpoint.first_sequence, checkpoint.last_sequence + 1)
        if any(sequence not in hashes for sequence in span):
            return None  # the entries it covers are not all verified (a divergence was named for them)
        if merkle_root([hashes[s] for s in span]).hex() != checkpoint.merkle_root:
            return Divergence(tenant_id, number, "checkpoint merkle_root", where)
        if hashes[checkpoint.last_sequence].hex() != checkpoint.head_hash:
            return Divergence(tenant_id, number, "checkpoint head_hash", where)
        expected_first = checkpoint.last_sequence + 1
    return None


def compare(tenant_id: str, projected: list[EntryRow], published: list[EntryRow]) -> Divergence | None:
    """Postgres against the topic, sequence by sequence (each already checked on its own)."""
    for sequence, (row, record) in enumerate(zip(projected, published, strict=False), start=1):
        if row.record != record.record:
            field = first_difference(record.record, row.record)
            return Divergence(tenant_id, sequence, field, "postgres vs topic")
    if len(projected) > len(published):
        return Divergence(
            tenant_id, len(published) + 1, "missing", "topic", "(in Postgres, not on the topic)"
        )
    return None


def _refold_policy() -> CheckpointPolicy:
    key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"tollgate audit re-fold").digest())
    return CheckpointPolicy(REFOLD_CHECKPOINT_ENTRIES, 2**62, key, key_id(key.public_key()))


class _NoState(dict):
    def items_with_prefix(self, prefix: bytes):
        return iter(())


def refold(
    tenant_id: str, events: list[LogRecord], published: list[EntryRow], source_topic: str
) -> Divergence | None:
    """Fold the tenant's records of `ledger.events` (its partition, in offset order) again, cut into the
    batches and sweeps its published links say, and compare every entry's bytes with the published ones."""
    processor = LedgerProcessor(
        _NoState(), source_topic=source_topic, outbox=False, checkpoints=_refold_policy()
    )
    groups: list[tuple[tuple[int, int, int], list[bytes]]] = []
    for row in published:
        position = split_record(row.record)[1].position
        if groups and groups[-1][0] == position:
            groups[-1][1].append(row.record)
        else:
            groups.append((position, [row.record]))
    fed = 0
    sequence = 0
    for position, records in groups:
        batch = []
        while fed < len(events) and events[fed].offset <= position[0]:
            batch.append(events[fed])
            fed += 1
        produced = _fold_group(processor, tenant_id, batch, position)
        for expected, got in zip(records, produced, strict=False):
            sequence += 1
            if expected != got:
                return Divergence(tenant_id, sequence, first_difference(expected, got), "refold")
        if len(produced) != len(records):
            field = "unpublished" if len(produced) > len(records) else "missing"
            return Divergence(
                tenant_id,
                sequence + 1,
                field,
                "refold",
                f"(re-fold {len(produced)}, published {len(records)})",
            )
    return None


def _fold_group(
    processor: LedgerProcessor, tenant_id: str, batch: list[LogRecord], position: tuple[int, int, int]
) -> list[bytes]:
    """One group of published entries again: the account brought to the watermark its batch began at
    (batch ends before it that published nothing moved it), the batch's records folded (a batch end), then
    a sweep to the group's stream time when the batch did not reach it (a quiet tenant's sweep)."""
    _, time, watermark = position
    key = tenant_id.encode()
    entries = [OutputRecord(key, encode_entry(entry)) for entry in processor.resume_at(tenant_id, watermark)]
    if batch:
        entries += processor.process(batch[0].partition, batch).entries
    if processor.tenant_position(tenant_id)[1] < time:
        entries += processor.advance([tenant_id], time).entries
    return [record.value for record in entries if record.key == key]


def check_admin_log(rows: list[AdminAuditRecord], public_key: Ed25519PublicKey) -> Divergence | None:
    """The admin audit log (gateway.admin.audit_log): its chain, each row's signed checkpoint, and each
    row's columns against its hashed body."""
    hashes, divergence = check_links(ADMIN_CHAIN, [EntryRow(row.record) for row in rows], "admin audit log")
    if divergence is not None:
        return divergence
    for row in rows:
        body = msgspec.json.decode(split_record(row.record)[0])
        columns = {
            "at": row.at_ms,
            "credential": row.credential_name,
            "role": row.role,
            "request_id": row.request_id,
            "action": row.action,
            "target": row.target,
            "details": row.details,
            "event_ids": row.event_ids,
        }
        field = next((name for name, value in columns.items() if body.get(name) != value), None)
        if field is not None:
            return Divergence(
                ADMIN_CHAIN, row.sequence, field, "admin audit log", "(the column differs from the row)"
            )
    signed = [(row.checkpoint, None) for row in rows]
    return check_checkpoints(ADMIN_CHAIN, signed, hashes, public_key, "admin audit log checkpoints")


async def admin_log(session: AsyncSession) -> list[AdminAuditRecord]:
    return list(
        (await session.execute(select(AdminAuditRecord).order_by(AdminAuditRecord.sequence))).scalars()
    )


# ------------------------------------------------------------------------------------------- loading


async def projected_entries(session: AsyncSession, tenant_id: str) -> list[EntryRow]:
    result = await session.execute(
        select(LedgerEntry)
        .where(LedgerEntry.tenant_id == tenant_id, LedgerEntry.chain_sequence.is_not(None))
        .order_by(LedgerEntry.sequence)
    )
    return [
        EntryRow(
            row.record,
            {
                "entry_id": row.entry_id,
                "tenant_id": row.tenant_id,
                "entry_type": row.entry_type,
                "amount": row.amount,
                "payload": row.payload,
                "chain_sequence": row.chain_sequence,
                "chain_hash": row.chain_hash,
            },
        )
        for row in result.scalars()
    ]


async def projected_checkpoints(session: AsyncSession, tenant_id: str) -> list[tuple[bytes, dict]]:
    result = await session.execute(
        select(LedgerCheckpoint)
        .where(LedgerCheckpoint.tenant_id == tenant_id)
        .order_by(LedgerCheckpoint.number)
    )
    return [
        (
            row.record,
            {
                "number": row.number,
                "first_sequence": row.first_sequence,
                "last_sequence": row.last_sequence,
                "head_hash": row.head_hash,
                "merkle_root": row.merkle_root,
                "stream_time_ms": row.stream_time_ms,
            },
        )
        for row in result.scalars()
    ]


async def read_topic(log: EventLog, topic: str, partitions: Iterable[int]) -> list[LogRecord]:
    records: list[LogRecord] = []
    for partition in partitions:
        end = await log.end_offset(topic, partition)
        offset = 0
        while offset < end:
            batch = await log.read(topic, partition, offset, READ_BATCH_MAX)
            if not batch:
                break
            records.extend(batch)
            offset = batch[-1].offset + 1
    return records


@dataclass
class TopicView:
    """The topics as one audit reads them: each tenant's entries (first copy per sequence: a repeat of a
    sequence must be byte-identical, else the repeat is the divergence), checkpoints and source records."""

    entries: dict[str, list[EntryRow]]
    checkpoints: dict[str, list[tuple[bytes, None]]]
    events: dict[str, list[LogRecord]]
    repeats: dict[str, Divergence]


def _wanted(record: LogRecord, tenants: set[str] | None) -> str | None:
    """The record's tenant, when it is one of `tenants` (all when None) and the record has a value."""
    tenant_id = record.key.decode() if record.key else None
    if tenant_id is None or record.value is None or (tenants is not None and tenant_id not in tenants):
        return None
    return tenant_id


def _add_entry(view: TopicView, seen: dict[tuple[str, int], bytes], tenant_id: str, value: bytes) -> None:
    try:
        sequence = split_record(value)[1].sequence
    except BrokenRecord:
        return  # published before the chain existed
    first = seen.setdefault((tenant_id, sequence), value)
    if first is value:
        view.entries.setdefault(tenant_id, []).append(EntryRow(value))
    elif first != value and tenant_id not in view.repeats:
        field = first_difference(first, value)
        view.repeats[tenant_id] = Divergence(tenant_id, sequence, field, "topic", "(a repeat differs)")


async def read_topics(log: EventLog, tenants: set[str] | None) -> TopicView:
    partitions: Iterable[int] = range(log.partitions)
    if tenants is not None:
        partitions = sorted({partition_for_key(t.encode(), log.partitions) for t in tenants})
    view = TopicView({}, {}, {}, {})
    seen: dict[tuple[str, int], bytes] = {}
    for record in await read_topic(log, log.topics.entries, partitions):
        tenant_id = _wanted(record, tenants)
        if tenant_id is not None:
            _add_entry(view, seen, tenant_id, record.value)
    numbers: set[tuple[str, int]] = set()
    for record in await read_topic(log, log.topics.checkpoints, partitions):
        tenant_id = _wanted(record, tenants)
        if tenant_id is None:
            continue
        try:
            number = split_signed(record.value)[1].number
        except BrokenRecord:
            number = -1
        if (tenant_id, number) not in numbers:
            numbers.add((tenant_id, number))
            view.checkpoints.setdefault(tenant_id, []).append((record.value, None))
    for record in await read_topic(log, log.topics.events, partitions):
        tenant_id = _wanted(record, tenants)
        if tenant_id is not None:
            view.events.setdefault(tenant_id, []).append(record)
    return view


@dataclass
class AuditReport:
    tenants: int = 0
    entries: int = 0
    checkpoints: int = 0
    divergences: list[Divergence] | None = None
    admin_actions: int = 0

    @property
    def ok(self) -> bool:
        return not self.divergences


async def verify(
    log: EventLog,
    session_factory: async_sessionmaker[AsyncSession],
    public_key: Ed25519PublicKey,
    tenants: set[str] | None = None,
    progress: Callable[[int], None] = lambda entries: None,
) -> AuditReport:
    """Every check, for every tenant (or those given); the first divergence of each tenant."""
    view = await read_topics(log, tenants)
    async with session_factory() as session:
        names = tenants or set(view.entries) | set(view.events) | set(
            (await session.execute(select(LedgerEntry.tenant_id).distinct())).scalars()
        )
        report = AuditReport(divergences=[])
        for tenant_id in sorted(names):
            projected = await projected_entries(session, tenant_id)
            signed = await projected_checkpoints(session, tenant_id)
            divergence = _verify_tenant(tenant_id, projected, signed, view, public_key, log.topics.events)
            if divergence is not None:
                report.divergences.append(divergence)
            report.tenants += 1
            report.entries += len(projected)
            report.checkpoints += len(signed)
            progress(len(projected))
        if tenants is None:
            rows = await admin_log(session)
            divergence = check_admin_log(rows, public_key)
            if divergence is not None:
                report.divergences.append(divergence)
            report.admin_actions = len(rows)
    return report


def _verify_tenant(
    tenant_id, projected, signed, view: TopicView, public_key, source_topic
) -> Divergence | None:
    published = view.entries.get(tenant_id, [])
    hashes, divergence = check_links(tenant_id, projected, "postgres")
    divergence = divergence or check_checkpoints(
        tenant_id, signed, hashes, public_key, "checkpoints (postgres)"
    )
    if divergence is not None:
        return divergence
    divergence = view.repeats.get(tenant_id)
    topic_hashes, divergence = (
        (hashes, divergence) if divergence else check_links(tenant_id, published, "topic")
    )
    divergence = divergence or check_checkpoints(
        tenant_id, view.checkpoints.get(tenant_id, []), topic_hashes, public_key, "checkpoints (topic)"
    )
    if len(signed) > len(view.checkpoints.get(tenant_id, [])) and divergence is None:
        divergence = Divergence(
            tenant_id,
            len(view.checkpoints.get(tenant_id, [])) + 1,
            "checkpoint number",
            "checkpoints (topic)",
            "(in Postgres, not on the topic)",
        )
    divergence = divergence or compare(tenant_id, projected, published)
    return divergence or refold(tenant_id, view.events.get(tenant_id, []), published, source_topic)
