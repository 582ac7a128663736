"""The embedded event log: the `streams.log.EventLog` contract in PostgreSQL, for `make run` (no broker).

    log_records          (topic, partition, log_offset) -> key, value, timestamp_ms
    log_partition_heads  (topic, partition) -> next_offset

An append takes the partition's head row (UPDATE ... RETURNING, a row lock), so concurrent appends to
one partition are serialised and commit in offset order: a reader never sees offset n+1 before n.
`append_in(connection, ...)` appends inside a caller's transaction, which is how the embedded processor
writes its outputs, its state and its offsets atomically (exactly once, unlike the Kafka path).

Readers in this process are woken at once by an in-process notification; readers in other processes
poll every `poll_interval_ms`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.codec import encode_event
from ledger.events import Event
from streams.records import LogPosition, LogRecord, partition_for_key
from streams.schema import log_partition_heads, log_records
from streams.settings import StreamSettings
from streams.spool import OutgoingRecord
from streams.topics import LedgerTopics

POLL_INTERVAL_MS = 100
READ_BATCH_MAX = 5_000

def wall_clock_ms() -> int:
    return int(time.time() * 1000)


class PostgresLog:
    def __init__(self, engine: AsyncEngine, settings: StreamSettings, *, poll_interval_ms: int = POLL_INTERVAL_MS) -> None:
        self.engine = engine
        self.settings = settings
        self.topics = LedgerTopics.from_settings(settings)
        self.partitions = settings.topic_partitions
        self._poll_interval_s = poll_interval_ms / 1000
        self._appended = asyncio.Event()  # replaced on each notification: waiting needs no lock

    async def start(self) -> None:
        rows = [
            {"topic": topic, "partition": partition, "next_offset": 0}
            for topic in (self.topics.events, self.topics.entries, self.topics.balances, self.topics.dlq, self.topics.keys)
            for partition in range(self.partitions)
        ]
        async with self.engine.begin() as connection:
            await connection.execute(insert(log_partition_heads).values(rows).on_conflict_do_nothing())

    async def stop(self) -> None:
        return None

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

    async def append_in(self, connection: AsyncConnection, records: Sequence[OutgoingRecord]) -> list[LogPosition]:
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
            rows = []
            for step, number in enumerate(numbers):
                record = records[number]
                rows.append({"topic": topic, "partition": partition, "log_offset": first + step,
                             "key": record.key, "value": record.value, "timestamp_ms": now})
                positions[number] = LogPosition(topic, partition, first + step)
            await connection.execute(insert(log_records), rows)
        return positions  # type: ignore[return-value]

    async def notify_appended(self) -> None:
        appended, self._appended = self._appended, asyncio.Event()
        appended.set()

    async def read(self, topic: str, partition: int, from_offset: int, max_records: int) -> list[LogRecord]:
        query = (
            select(log_records)
            .where(log_records.c.topic == topic, log_records.c.partition == partition, log_records.c.log_offset >= from_offset)
            .order_by(log_records.c.log_offset)
            .limit(max_records)
        )
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [LogRecord(r.topic, r.partition, r.log_offset, r.key, r.value, r.timestamp_ms) for r in rows]

    async def end_offset(self, topic: str, partition: int) -> int:
        query = select(log_partition_heads.c.next_offset).where(
            log_partition_heads.c.topic == topic, log_partition_heads.c.partition == partition
        )
        async with self.engine.connect() as connection:
            value = (await connection.execute(query)).scalar_one_or_none()
        if value is None:
            raise LookupError(f"embedded log has no partition {partition} of topic {topic}")
        return value

    async def tail(self, topic: str, *, from_beginning: bool, batch_max: int = 1_000) -> AsyncIterator[list[LogRecord]]:
        positions = {
            partition: 0 if from_beginning else await self.end_offset(topic, partition)
            for partition in range(self.partitions)
        }
        while True:
            batch: list[LogRecord] = []
            for partition, position in positions.items():
                records = await self.read(topic, partition, position, min(batch_max, READ_BATCH_MAX))
                if records:
                    positions[partition] = records[-1].offset + 1
                    batch.extend(records)
            if batch:
                yield batch
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._appended.wait(), timeout=self._poll_interval_s)
