"""The embedded event log: the `streams.log.EventLog` contract in PostgreSQL, for `make run` (no broker).

    log_records          (topic, partition, log_offset) -> key, value, timestamp_ms
    log_partition_heads  (topic, partition) -> next_offset

An append takes the partition's head row (UPDATE ... RETURNING, a row lock), so concurrent appends to
one partition are serialised and commit in offset order: a reader never sees offset n+1 before n.
`append_in(connection, ...)` appends inside a caller's transaction, which is how the embedded processor
writes its outputs, its state and its offsets atomically (exactly once, unlike the Kafka path).

Waking readers: every append transaction sends `NOTIFY tollgate_log_appended, '<topic>'` (delivered
at commit, so a woken reader finds the records), and each PostgresLog holds one connection that LISTENs
(psycopg 3's async notifies) and wakes its waiters: a tail, or a loop in `wait_for_append`. Appends in
this process also wake them directly. An idle log therefore runs no queries (a re-check a minute as a safety
net; every `idle_poll_interval_ms` while the listening connection is down and being re-opened), end
offsets are answered from memory while nothing was appended, and an appended record reaches a tail in
about one round trip. A tail reads every partition of its topic in
one query (each partition bounded by its share of `batch_max`, so a busy partition cannot starve the rest).

Waiting without losing a wake-up: take `append_mark(topics)` BEFORE reading, read, and pass the mark to
`wait_for_append`; it returns at once when anything was appended to those topics since the mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence

import psycopg
from sqlalchemy import func, select, union_all, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.codec import encode_event
from ledger.events import Event
from storage.embedded import EmbeddedLogHead, EmbeddedLogRecord
from streams.records import LogPosition, LogRecord, partition_for_key
from streams.settings import StreamSettings
from streams.spool import OutgoingRecord
from streams.topics import LedgerTopics

log_records = EmbeddedLogRecord.__table__
log_partition_heads = EmbeddedLogHead.__table__

log = logging.getLogger(__name__)

IDLE_POLL_INTERVAL_MS = 1_000  # re-check without a notification while the listener is down
LISTENING_RECHECK_INTERVAL_MS = 60_000  # re-check without a notification while it listens (a safety net)
LISTEN_RETRY_INTERVAL_MS = 1_000  # between attempts to re-open the listening connection
READ_BATCH_MAX = 5_000
NOTIFY_CHANNEL = "tollgate_log_appended"  # payload: the topic appended to


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


async def _append_time(connection: AsyncConnection, topic: str, partition: int, first: int, now: int) -> int:
    """The append time of records at `first` on: the clock, but never before the partition's previous record
    (the caller holds the partition head's row lock, so appends stamp in offset order). It is the events'
    knowledge time, which as-known-at answers and the audit snapshots need never to go back in a partition,
    even when another appender read the clock first or the clock steps back."""
    if first == 0:
        return now
    previous = await connection.execute(
        select(log_records.c.timestamp_ms).where(
            log_records.c.topic == topic,
            log_records.c.partition == partition,
            log_records.c.log_offset == first - 1,
        )
    )
    return max(now, previous.scalar_one_or_none() or 0)


class PostgresLog:
    def __init__(
        self,
        engine: AsyncEngine,
        settings: StreamSettings,
        *,
        idle_poll_interval_ms: int = IDLE_POLL_INTERVAL_MS,
    ) -> None:
        assert idle_poll_interval_ms > 0, "idle_poll_interval_ms must be positive"
        self.engine = engine
        self.settings = settings
        self.topics = LedgerTopics.from_settings(settings)
        self.partitions = settings.topic_partitions
        topics = self.topics
        self.topic_names = (
            topics.events,
            topics.entries,
            topics.balances,
            topics.dlq,
            topics.keys,
            topics.checkpoints,
            topics.alerts,
        )
        self._idle_poll_interval_s = idle_poll_interval_ms / 1000
        self._appended = asyncio.Event()  # replaced on each wake-up: waiting needs no lock
        self._append_counts: dict[str, int] = defaultdict(int)  # wake-ups per topic (marks compare sums)
        self._listener: asyncio.Task | None = None
        self._listening: asyncio.Event | None = None
        # (topic, partition) -> (append mark of the topic before the read, end offset): still exact while
        # the listener runs and the topic's mark has not moved, so an idle view's lag checks query nothing
        self._known_ends: dict[tuple[str, int], tuple[int, int]] = {}

    async def start(self) -> None:
        rows = [
            {"topic": topic, "partition": partition, "next_offset": 0}
            for topic in self.topic_names
            for partition in range(self.partitions)
        ]
        async with self.engine.begin() as connection:
            await connection.execute(insert(log_partition_heads).values(rows).on_conflict_do_nothing())

    async def stop(self) -> None:
        listener, self._listener, self._listening = self._listener, None, None
        if listener is not None:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    async def append(self, topic: str, key: bytes, value: bytes) -> LogPosition:
        [position] = await self.append_many([OutgoingRecord(topic, key, value)])
        return position

    async def publish(self, event: Event) -> LogPosition:
        return await self.append(self.topics.events, event.tenant_id.encode(), encode_event(event))

    async def append_many(self, records: Sequence[OutgoingRecord]) -> list[LogPosition]:
        async with self.engine.begin() as connection:
            positions = await self.append_in(connection, records)
        await self.notify_appended()
        return positions

    async def append_in(
        self, connection: AsyncConnection, records: Sequence[OutgoingRecord]
    ) -> list[LogPosition]:
        """Append inside the caller's transaction. Call `notify_appended()` after it commits."""
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)
        for number, record in enumerate(records):
            partition = partition_for_key(record.key or b"", self.partitions)
            groups[record.topic, partition].append(number)
        positions: list[LogPosition | None] = [None] * len(records)
        now = wall_clock_ms()
        for topic, partition in sorted(groups):  # one lock order for every appender: no deadlocks
            numbers = groups[topic, partition]
            head = await connection.execute(
                update(log_partition_heads)
                .where(log_partition_heads.c.topic == topic, log_partition_heads.c.partition == partition)
                .values(next_offset=log_partition_heads.c.next_offset + len(numbers))
                .returning(log_partition_heads.c.next_offset)
            )
            next_offset = head.scalar_one_or_none()
            if next_offset is None:
                raise LookupError(f"embedded log has no partition {partition} of topic {topic}")
            first = next_offset - len(numbers)
            stamp = await _append_time(connection, topic, partition, first, now)
            rows = []
            for step, number in enumerate(numbers):
                record = records[number]
                rows.append(
                    {
                        "topic": topic,
                        "partition": partition,
                        "log_offset": first + step,
                        "key": record.key,
                        "value": record.value,
                        "timestamp_ms": stamp,
                    }
                )
                positions[number] = LogPosition(topic, partition, first + step)
            await connection.execute(insert(log_records), rows)
        for topic in sorted({topic for topic, _ in groups}):  # sent by Postgres when the caller commits
            await connection.execute(select(func.pg_notify(NOTIFY_CHANNEL, topic)))
        return positions  # type: ignore[return-value]

    async def notify_appended(self, topics: Iterable[str] | None = None) -> None:
        """Wake this process's waiters on `topics` (all topics when None) at once."""
        self._wake(self.topic_names if topics is None else topics)

    def append_mark(self, topics: Iterable[str]) -> int:
        """Take before reading; `wait_for_append(topics, mark)` then misses nothing appended after it."""
        return sum(self._append_counts[topic] for topic in topics)

    async def wait_for_append(
        self,
        topics: Sequence[str],
        mark: int,
        stop: asyncio.Event | None = None,
        *,
        timeout_s: float | None = None,
    ) -> None:
        """Until something is appended to `topics` after `mark`, `stop` is set, or `timeout_s` passes (by
        default: the idle poll interval while the listener is down, a minute while it listens, since then a
        notification comes for every append). The caller re-reads in every case."""
        await self._ensure_listening()
        if timeout_s is None:
            timeout_s = (
                LISTENING_RECHECK_INTERVAL_MS / 1000 if self._is_listening() else self._idle_poll_interval_s
            )
        deadline = time.monotonic() + timeout_s
        while self.append_mark(topics) == mark and not (stop is not None and stop.is_set()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            waiters = [asyncio.ensure_future(self._appended.wait())]
            if stop is not None:
                waiters.append(asyncio.ensure_future(stop.wait()))
            try:
                await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    def _wake(self, topics: Iterable[str]) -> None:
        for topic in topics:
            self._append_counts[topic] += 1
        appended, self._appended = self._appended, asyncio.Event()
        appended.set()

    async def _ensure_listening(self) -> None:
        if self._listener is None or self._listener.done():
            self._listening = asyncio.Event()
            self._listener = asyncio.create_task(self._listen(self._listening), name="embedded-log-listener")
        listening = self._listening
        assert listening is not None
        with contextlib.suppress(TimeoutError):  # not listening yet: the idle poll covers the gap
            await asyncio.wait_for(listening.wait(), timeout=self._idle_poll_interval_s)

    async def _listen(self, listening: asyncio.Event) -> None:
        """LISTEN on one dedicated connection and wake waiters per notification; re-open it when it drops
        (waking everyone, since notifications sent meanwhile are lost)."""
        url = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as connection:
                    await connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    listening.set()
                    self._wake(self.topic_names)
                    async for notification in connection.notifies():
                        self._wake([notification.payload])
            except (psycopg.Error, OSError) as error:
                log.warning("embedded log: listening for appends failed (%s); retrying", error)
            listening.clear()  # cached end offsets are not trusted until it listens again
            self._wake(self.topic_names)  # waiters re-read, then wait at the idle poll interval meanwhile
            await asyncio.sleep(LISTEN_RETRY_INTERVAL_MS / 1000)

    async def read(self, topic: str, partition: int, from_offset: int, max_records: int) -> list[LogRecord]:
        query = (
            select(log_records)
            .where(
                log_records.c.topic == topic,
                log_records.c.partition == partition,
                log_records.c.log_offset >= from_offset,
            )
            .order_by(log_records.c.log_offset)
            .limit(max_records)
        )
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [LogRecord(r.topic, r.partition, r.log_offset, r.key, r.value, r.timestamp_ms) for r in rows]

    async def end_offset(self, topic: str, partition: int) -> int:
        mark = self.append_mark([topic])
        known = self._known_ends.get((topic, partition))
        if known is not None and known[0] == mark and self._is_listening():
            return known[1]
        query = select(log_partition_heads.c.next_offset).where(
            log_partition_heads.c.topic == topic, log_partition_heads.c.partition == partition
        )
        async with self.engine.connect() as connection:
            value = (await connection.execute(query)).scalar_one_or_none()
        if value is None:
            raise LookupError(f"embedded log has no partition {partition} of topic {topic}")
        self._known_ends[topic, partition] = (mark, value)
        return value

    def _is_listening(self) -> bool:
        listening, listener = self._listening, self._listener
        return listening is not None and listening.is_set() and listener is not None and not listener.done()

    async def read_partitions(
        self, topic: str, positions: dict[int, int], max_records: int
    ) -> list[LogRecord]:
        """Records of several partitions from their positions, in ONE query; each partition gives at most
        its share of `max_records` (at least one), so none starves the others."""
        assert max_records > 0, "max_records must be positive"
        if not positions:
            return []
        share = max(1, max_records // len(positions))
        parts = [
            select(log_records)
            .where(
                log_records.c.topic == topic,
                log_records.c.partition == partition,
                log_records.c.log_offset >= offset,
            )
            .order_by(log_records.c.log_offset)
            .limit(share)
            for partition, offset in sorted(positions.items())
        ]
        query = parts[0] if len(parts) == 1 else union_all(*parts)
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        records = [
            LogRecord(r.topic, r.partition, r.log_offset, r.key, r.value, r.timestamp_ms) for r in rows
        ]
        records.sort(key=lambda record: (record.partition, record.offset))
        return records

    async def tail(
        self, topic: str, *, from_beginning: bool, batch_max: int = 1_000
    ) -> AsyncIterator[list[LogRecord]]:
        await self._ensure_listening()  # before the end offsets: nothing appended after them is missed
        positions = {
            partition: 0 if from_beginning else await self.end_offset(topic, partition)
            for partition in range(self.partitions)
        }
        while True:
            mark = self.append_mark([topic])
            batch = await self.read_partitions(topic, positions, min(batch_max, READ_BATCH_MAX))
            for record in batch:
                positions[record.partition] = record.offset + 1
            if batch:
                yield batch
                continue
            await self.wait_for_append([topic], mark)
