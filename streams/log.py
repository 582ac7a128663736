"""The event log contract: what every Tollgate process needs from Kafka, and what the embedded log
(streams.embedded_log, in Postgres) provides the same way.

    append / append_many   keyed records; a key always lands on the same partition (murmur2, as Kafka)
    publish                a ledger event on `ledger.events`, key = tenant id
    read                   records of one partition from an offset (replay from any point)
    end_offset             the offset the next record of a partition will get
    tail                   batches from every partition of a topic, from the beginning or the end

Offsets start at 0 and grow by one per record within a partition. The shared contract tests
(tests/streams/test_log_contract.py) run over both implementations.

A consumer that polls (the webhook dispatcher, the top-up agent) idles with `append_mark` taken before it
reads and `idle_until_appended` after a read that found nothing: the embedded log wakes it on an append
(LISTEN/NOTIFY), so an idle `tollgate dev` does not query Postgres at the poll rate; over Kafka it waits the
poll interval it was given.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition

from ledger.codec import encode_event
from ledger.events import Event
from streams.producer import EventProducer
from streams.records import LogPosition, LogRecord
from streams.settings import StreamSettings
from streams.spool import OutgoingRecord
from streams.topics import LedgerTopics

TAIL_POLL_TIMEOUT_MS = 200
READ_TIMEOUT_MS = 5_000


def append_mark(log: EventLog, topics: Sequence[str]) -> int | None:
    """The log's append count of `topics` where it can wait for appends (the embedded log), else None."""
    mark = getattr(log, "append_mark", None)
    return None if mark is None else mark(topics)


async def idle_until_appended(
    log: EventLog, topics: Sequence[str], mark: int | None, stop: asyncio.Event, poll_s: float, idle_s: float
) -> None:
    """After a read that found nothing: until `stop`, and until something is appended to `topics` after
    `mark` or `idle_s` passes (a log that wakes on appends), else until `poll_s` passes (Kafka)."""
    if mark is not None:
        await log.wait_for_append(topics, mark, stop, timeout_s=idle_s)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), poll_s)


class EventLog(Protocol):
    topics: LedgerTopics
    partitions: int

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def append(self, topic: str, key: bytes, value: bytes) -> LogPosition: ...

    async def append_many(self, records: Sequence[OutgoingRecord]) -> list[LogPosition]: ...

    async def publish(self, event: Event) -> LogPosition: ...

    async def read(
        self, topic: str, partition: int, from_offset: int, max_records: int
    ) -> list[LogRecord]: ...

    async def end_offset(self, topic: str, partition: int) -> int: ...

    def tail(
        self, topic: str, *, from_beginning: bool, batch_max: int = 1_000
    ) -> AsyncIterator[list[LogRecord]]: ...


class KafkaLog:
    """The contract over a real broker: appends through the one idempotent EventProducer."""

    def __init__(self, settings: StreamSettings, producer: EventProducer | None = None) -> None:
        self.settings = settings
        self.topics = LedgerTopics.from_settings(settings)
        self.partitions = settings.topic_partitions
        self._producer = producer or EventProducer(settings)
        self._owns_producer = producer is None
        self._reader: AIOKafkaConsumer | None = None  # read(): assigned one partition at a time
        self._offsets_client: AIOKafkaConsumer | None = None  # end_offset(): never assigned, never fetching
        self._reader_lock = asyncio.Lock()

    @property
    def producer(self) -> EventProducer:
        return self._producer

    async def start(self) -> None:
        if self._owns_producer:
            await self._producer.start()

    async def stop(self) -> None:
        for client in (self._reader, self._offsets_client):
            if client is not None:
                await client.stop()
        self._reader = self._offsets_client = None
        if self._owns_producer:
            await self._producer.stop()

    async def append(self, topic: str, key: bytes, value: bytes) -> LogPosition:
        return _position(await self._producer.send(topic, key, value))

    async def append_many(self, records: Sequence[OutgoingRecord]) -> list[LogPosition]:
        return [_position(receipt) for receipt in await self._producer.send_many(records)]

    async def publish(self, event: Event) -> LogPosition:
        return await self.append(self.topics.events, event.tenant_id.encode(), encode_event(event))

    async def read(self, topic: str, partition: int, from_offset: int, max_records: int) -> list[LogRecord]:
        async with self._reader_lock:
            reader = await self._ensure_reader()
            tp = TopicPartition(topic, partition)
            reader.assign([tp])
            end = (await reader.end_offsets([tp]))[tp]
            if from_offset >= end:
                return []
            reader.seek(tp, from_offset)
            out: list[LogRecord] = []
            while len(out) < max_records:
                batch = await reader.getmany(
                    tp, timeout_ms=READ_TIMEOUT_MS, max_records=max_records - len(out)
                )
                messages = batch.get(tp, [])
                if not messages:
                    break
                out.extend(_record(m) for m in messages)
                if messages[-1].offset + 1 >= end:
                    break
            return out

    async def end_offset(self, topic: str, partition: int) -> int:
        async with self._reader_lock:
            if self._offsets_client is None:
                self._offsets_client = self._new_consumer()
                await self._offsets_client.start()
            tp = TopicPartition(topic, partition)
            return (await self._offsets_client.end_offsets([tp]))[tp]

    async def tail(
        self, topic: str, *, from_beginning: bool, batch_max: int = 1_000
    ) -> AsyncIterator[list[LogRecord]]:
        consumer = self._new_consumer()
        await consumer.start()
        try:
            partitions = [TopicPartition(topic, p) for p in range(self.partitions)]
            consumer.assign(partitions)
            if from_beginning:
                await consumer.seek_to_beginning(*partitions)
            else:
                await consumer.seek_to_end(*partitions)
            while True:
                batches = await consumer.getmany(timeout_ms=TAIL_POLL_TIMEOUT_MS, max_records=batch_max)
                records = [_record(m) for messages in batches.values() for m in messages]
                if records:
                    yield records
        finally:
            await consumer.stop()

    async def _ensure_reader(self) -> AIOKafkaConsumer:
        if self._reader is None:
            self._reader = self._new_consumer()
            await self._reader.start()
        return self._reader

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            request_timeout_ms=self.settings.admin_request_timeout_ms,
        )


def _record(message) -> LogRecord:
    return LogRecord(
        message.topic, message.partition, message.offset, message.key, message.value, message.timestamp
    )


def _position(receipt) -> LogPosition:
    return LogPosition(receipt.topic, receipt.partition, receipt.offset, receipt.spooled)
