"""The Postgres projector: folds the ledger topics into tables, exactly once.

    ledger.events   -> ledger_events  (archive of every event, unique on event id)
    ledger.entries  -> ledger_entries (append-only, unique on entry id) and CreditExpired into ledger_events
    ledger.balances -> balances       (latest record per tenant; a tombstone deletes the row)
    ledger.checkpoints -> ledger_checkpoints (signed checkpoints of the entries' hash chains, unique on
                      tenant and number); an entry's chain link and published bytes go on its row

Exactly once: each bounded batch is written in ONE transaction together with the next offset of every
partition it read (`projector_offsets`). Kafka offsets are never committed to the broker (there is no
consumer group): the projector assigns itself every partition of the three topics and seeks each to the
offset stored in Postgres. Run one projector per name; a restarted one starts at once, without waiting
out a dead group member's session. A crash anywhere before the
commit loses the whole batch's rows and offsets together, so the restart reads the same records again;
a crash after it resumes after them. Rows are also inserted with ON CONFLICT DO NOTHING on their ids,
so a duplicate record on a topic (a producer retry) changes nothing either.

No single record stops the projector. A record that does not decode, or that Postgres refuses (a data
or integrity error: a balance beyond bigint, a NUL in a JSON string), goes to ledger.dlq with the reason
(the stream processor's `DeadLetter` shape) and its offset advances like any other. When a batch's write
fails that way, the batch is written again one record at a time, each in a savepoint, and only the
records Postgres refuses are dead-lettered. Dead letters are appended before the offsets commit, so a
crash in between appends them again on the retry (at least once, like every dead letter). Errors that
are not about a record (the database or the log away) still raise: the projector retries from its
stored offsets once restarted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ledger.codec import decode_event
from ledger.entries import (
    AllocationCorrected,
    GrantRecorded,
    UsageAllocated,
    check_allocation_corrected,
    check_usage_allocated,
    decode_entry,
)
from ledger.events import CreditExpired, Event, InvalidEvent
from ledger.statement import movements
from storage.audit import LedgerCheckpoint
from storage.database import DatabaseSettings
from storage.finance import (
    GrantTermsRow,
    entry_finance_columns,
    grant_terms_values,
    movement_values,
    write_movements,
)
from storage.projections import Balance, LedgerEntry, LedgerEvent, stored_offsets, write_offsets
from streams.audit_checkpoints import AuditSettings
from streams.audit_rows import chain_columns, checkpoint_row
from streams.fold_tracing import FoldSpans
from streams.log import KafkaLog
from streams.records import BalanceRecord, DeadLetter, LogPosition, LogRecord
from streams.service import run_until_signalled, with_database_and_log
from streams.settings import StreamSettings
from streams.snapshotter import Snapshotter
from streams.spool import OutgoingRecord
from streams.topics import LedgerTopics, describe_partition_counts
from tollgate.tracing_setup import install_otlp_provider, tracing_enabled

logger = logging.getLogger(__name__)

ENTRY_TIME_FIELDS = ("occurred_at", "voided_at", "expired_at")  # whichever the entry type has
ENTRY_AMOUNT_FIELDS = ("amount", "delta")
# One SQL statement carries at most this many bind parameters (the wire protocol counts them in 16 bits).
POSTGRES_BIND_PARAMETERS_MAX = 65_535


class ProjectorSettings(BaseSettings):
    """Environment prefix `TOLLGATE_PROJECTOR_`."""

    model_config = SettingsConfigDict(env_prefix="TOLLGATE_PROJECTOR_", extra="ignore")

    name: str = Field(default="postgres", min_length=1, max_length=128)  # the key of its stored offsets
    batch_records_max: int = Field(default=500, ge=1, le=5_000)  # rows are inserted in parameter-sized chunks
    poll_timeout_ms: int = Field(default=1_000, ge=1)  # the longest a fetch waits for new records
    fetch_bytes_max: int = Field(default=8 * 1024 * 1024, ge=1024)  # bytes one fetch may bring
    request_timeout_ms: int = Field(default=40_000, ge=1_000)  # one broker request
    # OTLP/HTTP endpoint for the spans of traced usage events' folds (streams.fold_tracing); unset: none
    otlp_traces_endpoint: str | None = None


class ProjectorError(RuntimeError):
    """The projector cannot run: the message says why."""


class DeadLetterLog(Protocol):
    """Where the projector appends dead letters: `streams.log.EventLog` (Kafka or embedded) is one."""

    async def append_many(self, records: Sequence[OutgoingRecord]) -> list[LogPosition]: ...


_balance_decoder = msgspec.json.Decoder(BalanceRecord)
_json = msgspec.json.Encoder()
UNDECODABLE = (InvalidEvent, msgspec.MsgspecError, UnicodeDecodeError, KeyError, TypeError, ValueError)


@dataclass
class BatchRows:
    """The rows one batch produces, deduplicated by key, and the offsets it advances to."""

    events: dict[str, dict] = field(default_factory=dict)
    entries: dict[str, dict] = field(default_factory=dict)
    balances: dict[str, dict | None] = field(default_factory=dict)  # None: tombstone, delete the row
    checkpoints: dict[tuple[str, int], dict] = field(default_factory=dict)
    movements: dict[str, list[dict]] = field(default_factory=dict)  # by entry id (storage.finance)
    grant_terms: dict[str, dict] = field(default_factory=dict)
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    dead_letters: list[OutgoingRecord] = field(default_factory=list)  # for topics.dlq, with the reason

    @property
    def skipped(self) -> int:
        return len(self.dead_letters)


def dead_letter(topics: LedgerTopics, record: LogRecord, reason: str) -> OutgoingRecord:
    logger.warning("dead letter %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)
    letter = DeadLetter(
        reason=reason,
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp_ms=record.timestamp_ms,
        key=record.key,
        value=record.value,
    )
    return OutgoingRecord(topics.dlq, record.key, _json.encode(letter))


def _event_row(event: Event, record: LogRecord, now_ms: int) -> dict:
    return {
        "event_id": event.event_id,
        "tenant_id": event.tenant_id,
        "event_type": type(event).__struct_config__.tag,
        "occurred_at_ms": event.timestamp,
        "payload": msgspec.to_builtins(event),
        "source_topic": record.topic,
        "source_partition": record.partition,
        "source_offset": record.offset,
        "recorded_at_ms": now_ms,
        "known_at_ms": record.timestamp_ms or None,  # the log's append time: knowledge time (0: unknown)
    }


def _first_int(payload: dict, names: Iterable[str]) -> int | None:
    for name in names:
        value = payload.get(name)
        if isinstance(value, int):
            return value
    return None


def _entry_row(payload: dict, entry_id: str, record: LogRecord, now_ms: int) -> dict:
    return {
        "entry_id": entry_id,
        "tenant_id": payload["tenant_id"],
        "entry_type": payload["type"],
        "occurred_at_ms": _first_int(payload, ENTRY_TIME_FIELDS),
        "amount": _first_int(payload, ENTRY_AMOUNT_FIELDS),
        "cached_prompt_tokens": _first_int(payload, ("cached_prompt_tokens",)),  # usage entries only
        "prompt_version": payload.get("prompt_version"),  # usage entries built with a prompt version
        "api_key_id": payload.get("api_key_id"),  # usage entries of requests made with an API key
        "payload": payload,
        "source_topic": record.topic,
        "source_partition": record.partition,
        "source_offset": record.offset,
        "recorded_at_ms": now_ms,
        "known_at_ms": record.timestamp_ms or None,
    }


def rows_of_batch(topics: LedgerTopics, records: Sequence[LogRecord], now_ms: int) -> BatchRows:
    """Pure: the rows and offsets a batch of records turns into. Later records win for balances."""
    rows = BatchRows()
    for record in records:
        key = (record.topic, record.partition)
        rows.next_offsets[key] = max(rows.next_offsets.get(key, 0), record.offset + 1)
        try:
            _add_record(rows, topics, record, now_ms)
        except UNDECODABLE as error:
            rows.dead_letters.append(dead_letter(topics, record, f"undecodable: {error}"))
    return rows


def _add_record(rows: BatchRows, topics: LedgerTopics, record: LogRecord, now_ms: int) -> None:
    if record.topic == topics.balances:
        if record.value is None:
            if record.key is not None:
                rows.balances[record.key.decode()] = None
            return
        balance = _balance_decoder.decode(record.value)
        rows.balances[balance.tenant_id] = {
            "tenant_id": balance.tenant_id,
            "balance": balance.balance,
            "overage": balance.overage,
            "as_of_ms": balance.as_of,
            "updated_at_ms": now_ms,
        }
        return
    if record.value is None:
        raise InvalidEvent("empty value on a ledger topic")
    if record.topic == topics.events:
        event = decode_event(record.value)
        rows.events.setdefault(event.event_id, _event_row(event, record, now_ms))
        return
    if record.topic == topics.checkpoints:
        row = checkpoint_row(record, now_ms)
        rows.checkpoints.setdefault((row["tenant_id"], row["number"]), row)
        return
    assert record.topic == topics.entries, f"record from a topic the projector does not read: {record.topic}"
    entry = decode_entry(record.value)
    _check_money(entry)
    payload = msgspec.to_builtins(entry)
    rows.entries.setdefault(
        entry.entry_id, {**_entry_row(payload, entry.entry_id, record, now_ms), **chain_columns(record.value)}
    )
    entry_movements = movement_values(entry.tenant_id, movements(entry))
    rows.movements.setdefault(entry.entry_id, entry_movements)
    rows.entries[entry.entry_id].update(entry_finance_columns(entry_movements))
    if type(entry) is GrantRecorded:
        rows.grant_terms.setdefault(entry.grant_id, grant_terms_values(entry, payload))
    if isinstance(entry, CreditExpired):  # a derived event: archived with the others
        rows.events.setdefault(entry.event_id, _event_row(entry, record, now_ms))


def _check_money(entry) -> None:
    """The fold asserted these before it wrote the entry; here, after reading, an entry that does not add up
    is input from a topic (not necessarily ours), so it is refused like an undecodable record: dead-lettered
    with the reason, and the projector goes on (no single record may stop it)."""
    try:
        if type(entry) is UsageAllocated:
            check_usage_allocated(entry)
        elif type(entry) is AllocationCorrected:
            check_allocation_corrected(entry)
    except AssertionError as broken:
        raise InvalidEvent(f"the entry's money does not add up: {broken}") from None


async def _insert_new(session: AsyncSession, model, rows: list[dict]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING, in as many statements as keep each one under PostgreSQL's limit
    on bind parameters (a row of `ledger_entries` has a score of columns: 5,000 of them in one statement
    would not fit)."""
    if not rows:
        return
    rows_per_statement = max(1, POSTGRES_BIND_PARAMETERS_MAX // len(rows[0]))
    for start in range(0, len(rows), rows_per_statement):
        chunk = rows[start : start + rows_per_statement]
        await session.execute(insert(model).values(chunk).on_conflict_do_nothing())


async def write_batch(session: AsyncSession, projector_name: str, rows: BatchRows) -> None:
    """Write a batch's rows and offsets in the caller's transaction."""
    await _insert_new(session, LedgerEvent, list(rows.events.values()))
    await _insert_new(session, LedgerEntry, list(rows.entries.values()))
    await write_movements(session, [row for entry_rows in rows.movements.values() for row in entry_rows])
    if rows.grant_terms:
        await session.execute(insert(GrantTermsRow).on_conflict_do_nothing(), list(rows.grant_terms.values()))
    await _insert_new(session, LedgerCheckpoint, list(rows.checkpoints.values()))
    upserts = [row for row in rows.balances.values() if row is not None]
    if upserts:
        statement = insert(Balance).values(upserts)
        await session.execute(
            statement.on_conflict_do_update(
                index_elements=[Balance.tenant_id],
                set_={
                    name: statement.excluded[name]
                    for name in ("balance", "overage", "as_of_ms", "updated_at_ms")
                },
            )
        )
    tombstones = [tenant_id for tenant_id, row in rows.balances.items() if row is None]
    if tombstones:
        await session.execute(delete(Balance).where(Balance.tenant_id.in_(tombstones)))
    await write_offsets(session, projector_name, rows.next_offsets)


BeforeCommit = Callable[[Sequence[LogRecord]], Awaitable[None]]


def is_record_fault(error: Exception) -> bool:
    """Postgres refused the data (it would refuse it again), as opposed to being unreachable or broken."""
    if isinstance(error, (DataError, IntegrityError)):
        return True
    return isinstance(error, StatementError) and not isinstance(error, DBAPIError)  # refused client-side


async def project_records(
    session_factory: async_sessionmaker[AsyncSession],
    projector_name: str,
    topics: LedgerTopics,
    records: Sequence[LogRecord],
    now_ms: int,
    dead_letter_log: DeadLetterLog,
    before_commit: BeforeCommit | None = None,
) -> BatchRows:
    """Project a batch in one transaction with its offsets; every record Postgres refuses or that does not
    decode is dead-lettered instead. Returns the batch's rows (its dead letters among them)."""
    rows = rows_of_batch(topics, records, now_ms)
    try:
        async with session_factory() as session, session.begin():
            await write_batch(session, projector_name, rows)
            await _finish_batch(records, rows, dead_letter_log, before_commit)
        return rows
    except Exception as error:
        if not is_record_fault(error):
            raise
        logger.warning(
            "batch of %d records refused (%s); writing it one record at a time", len(records), error
        )
    rows = rows_of_batch(topics, records, now_ms)
    async with session_factory() as session, session.begin():
        for record in records:
            single = rows_of_batch(topics, [record], now_ms)
            if single.dead_letters:
                continue  # already among rows.dead_letters
            single.next_offsets.clear()  # the whole batch's offsets are written once, below
            try:
                async with session.begin_nested():
                    await write_batch(session, projector_name, single)
            except Exception as error:
                if not is_record_fault(error):
                    raise
                rows.dead_letters.append(
                    dead_letter(topics, record, f"refused by Postgres: {error.orig or error}")
                )
        await write_batch(session, projector_name, BatchRows(next_offsets=rows.next_offsets))
        await _finish_batch(records, rows, dead_letter_log, before_commit)
    return rows


async def _finish_batch(
    records: Sequence[LogRecord],
    rows: BatchRows,
    dead_letter_log: DeadLetterLog,
    before_commit: BeforeCommit | None,
) -> None:
    """Before the offsets commit: the dead letters are appended (a crash appends them again on the retry)."""
    if rows.dead_letters:
        await dead_letter_log.append_many(rows.dead_letters)
    if before_commit is not None:
        await before_commit(records)


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Projector:
    """Consumes the ledger topics into Postgres. `step()` handles one bounded batch; `run()` loops.

    `before_commit` is called with each batch after its rows are written and before the transaction
    commits: tests use it to kill the projector in the middle of a batch.
    """

    def __init__(
        self,
        *,
        settings: ProjectorSettings,
        topics: LedgerTopics,
        bootstrap_servers: str,
        session_factory: async_sessionmaker[AsyncSession],
        dead_letter_log: DeadLetterLog,
        before_commit: BeforeCommit | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
        snapshot_every_events: int | None = None,  # None: TOLLGATE_AUDIT_SNAPSHOT_EVERY_EVENTS
    ) -> None:
        self.settings = settings
        self.dead_letter_log = dead_letter_log
        self.topics = topics
        self.bootstrap_servers = bootstrap_servers
        self.session_factory = session_factory
        self.before_commit = before_commit
        self.clock_ms = clock_ms
        self.records_projected = 0
        self.records_skipped = 0
        self.snapshotter = Snapshotter.of(session_factory, snapshot_every_events, clock_ms)
        self.fold_spans: FoldSpans | None = None  # made at the first batch with tracing on
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            group_id=None,  # offsets live in Postgres, in the rows' transaction
            client_id=f"tollgate-projector-{settings.name}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_records=settings.batch_records_max,
            fetch_max_bytes=settings.fetch_bytes_max,
            request_timeout_ms=settings.request_timeout_ms,
        )

    async def start(self) -> None:
        names = (self.topics.events, self.topics.entries, self.topics.balances, self.topics.checkpoints)
        counts = await describe_partition_counts(
            self.bootstrap_servers, names, request_timeout_ms=self.settings.request_timeout_ms
        )
        missing = [name for name in names if not counts.get(name)]
        if missing:
            raise ProjectorError(
                f"topics {missing} do not exist; create them first (streams.topics.ensure_topics)"
            )
        partitions = [TopicPartition(name, number) for name in names for number in range(counts[name])]
        await self.consumer.start()
        self.consumer.assign(partitions)
        await self.seek_to_stored_offsets(partitions)

    async def stop(self) -> None:
        await self.consumer.stop()

    async def __aenter__(self) -> Projector:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    async def seek_to_stored_offsets(self, partitions: Iterable[TopicPartition]) -> None:
        async with self.session_factory() as session:
            offsets = await stored_offsets(session, self.settings.name)
        for partition in partitions:
            next_offset = offsets.get((partition.topic, partition.partition))
            if next_offset is None:
                await self.consumer.seek_to_beginning(partition)
            else:
                self.consumer.seek(partition, next_offset)
        logger.info("projector %s resumes at %s", self.settings.name, offsets)

    async def step(self) -> int:
        """Read at most `batch_records_max` records and project them in one transaction; their count."""
        fetched = await self.consumer.getmany(
            timeout_ms=self.settings.poll_timeout_ms, max_records=self.settings.batch_records_max
        )
        records = [
            # the record's timestamp: ledger.events stamps the broker's append time, the knowledge time
            LogRecord(
                record.topic, record.partition, record.offset, record.key, record.value, record.timestamp
            )
            for batch in fetched.values()
            for record in batch
        ]
        if records:
            await self.project(records)
        return len(records)

    async def project(self, records: Sequence[LogRecord]) -> None:
        assert len(records) <= self.settings.batch_records_max, "batch larger than batch_records_max"
        rows = await project_records(
            self.session_factory,
            self.settings.name,
            self.topics,
            records,
            self.clock_ms(),
            self.dead_letter_log,
            self.before_commit,
        )
        self.records_projected += len(records) - rows.skipped
        self.records_skipped += rows.skipped
        await self.snapshotter.after_batch(rows.events.values())  # the point-in-time snapshots it made due
        if tracing_enabled():  # per batch: a provider installed after start counts (tollgate dev's gateway)
            self.fold_spans = self.fold_spans or FoldSpans()
            self.fold_spans.after_batch(rows.events.values(), rows.entries.values())

    async def run(self, stop: asyncio.Event) -> None:
        """Project until `stop` is set."""
        while not stop.is_set():
            await self.step()


async def run_projector(
    database_settings: DatabaseSettings,
    stream_settings: StreamSettings,
    projector_settings: ProjectorSettings,
    stop: asyncio.Event,
    audit_settings: AuditSettings | None = None,
) -> None:
    """Wait for and migrate the database, create missing topics, then project until `stop` is set."""
    install_otlp_provider(projector_settings.otlp_traces_endpoint, "tollgate-projector")

    async def project(dead_letter_log: KafkaLog, sessions: async_sessionmaker[AsyncSession]) -> None:
        projector = Projector(
            settings=projector_settings,
            topics=LedgerTopics.from_settings(stream_settings),
            bootstrap_servers=stream_settings.kafka_bootstrap_servers,
            session_factory=sessions,
            dead_letter_log=dead_letter_log,
            snapshot_every_events=(audit_settings or AuditSettings()).snapshot_every_events,
        )
        async with projector:
            await projector.run(stop)

    await with_database_and_log(database_settings, stream_settings, project)


def main() -> None:
    """`python -m streams.projector`: run until SIGINT or SIGTERM. Settings from the environment."""
    run_until_signalled(
        lambda stop: run_projector(DatabaseSettings(), StreamSettings(), ProjectorSettings(), stop)
    )


if __name__ == "__main__":
    main()
