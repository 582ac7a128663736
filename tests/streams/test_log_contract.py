"""One contract, two logs: the same tests over Kafka (a real broker) and the embedded Postgres log."""

from __future__ import annotations

import asyncio

import pytest

from ledger.codec import decode_event
from ledger.events import UsageRecorded
from storage.database import build_async_engine
from streams.embedded_log import PostgresLog
from streams.log import KafkaLog
from streams.records import partition_for_key
from streams.spool import OutgoingRecord
from tests.streams.helpers import create_ledger_topics, stream_settings

TAIL_TIMEOUT_S = 30


@pytest.fixture(params=["kafka", "postgres"])
async def event_log(request, topic_prefix, tmp_path):
    if request.param == "kafka":
        broker = request.getfixturevalue("kafka_broker")
        settings = stream_settings(broker.bootstrap, topic_prefix, tmp_path)
        await create_ledger_topics(settings)
        log = KafkaLog(settings)
        await log.start()
        yield log
        await log.stop()
    else:
        database_url = request.getfixturevalue("database_url")
        settings = stream_settings("unused:9092", topic_prefix, tmp_path)
        engine = build_async_engine(database_url, request.getfixturevalue("database_settings"))
        log = PostgresLog(engine, settings)
        await log.start()
        yield log
        await log.stop()
        await engine.dispose()


async def test_offsets_start_at_zero_and_grow_by_one_per_partition(event_log):
    topic = event_log.topics.entries
    positions = await event_log.append_many(
        [OutgoingRecord(topic, f"k{n % 4}".encode(), f"v{n}".encode()) for n in range(40)]
    )
    by_partition = {}
    for position in positions:
        by_partition.setdefault(position.partition, []).append(position.offset)
    for offsets in by_partition.values():
        assert offsets == list(range(len(offsets)))
    for partition, offsets in by_partition.items():
        assert await event_log.end_offset(topic, partition) == len(offsets)


async def test_a_key_always_lands_on_the_same_partition_as_kafkas_partitioner(event_log):
    topic = event_log.topics.entries
    for key in (b"acme", b"globex", b"initech", b"umbrella"):
        positions = await event_log.append_many([OutgoingRecord(topic, key, b"x") for _ in range(3)])
        assert {p.partition for p in positions} == {partition_for_key(key, event_log.partitions)}


async def test_read_replays_from_any_offset_in_order(event_log):
    topic = event_log.topics.dlq
    positions = await event_log.append_many(
        [OutgoingRecord(topic, b"acme", f"v{n}".encode()) for n in range(25)]
    )
    partition = positions[0].partition
    records = await event_log.read(topic, partition, 10, 100)
    assert [r.offset for r in records] == list(range(10, 25))
    assert [r.value for r in records] == [f"v{n}".encode() for n in range(10, 25)]
    assert all(r.key == b"acme" and r.timestamp_ms > 0 for r in records)
    assert [r.value for r in await event_log.read(topic, partition, 3, 2)] == [b"v3", b"v4"]
    assert await event_log.read(topic, partition, 25, 10) == []


async def test_publish_puts_a_ledger_event_on_the_events_topic_keyed_by_tenant(event_log):
    event = UsageRecorded(event_id="req-1", tenant_id="acme", amount=5, occurred_at=1, model="m")
    position = await event_log.publish(event)
    [record] = await event_log.read(event_log.topics.events, position.partition, position.offset, 1)
    assert record.key == b"acme"
    assert decode_event(record.value) == event


async def test_tail_from_the_beginning_then_live_appends(event_log):
    topic = event_log.topics.balances
    await event_log.append_many([OutgoingRecord(topic, f"t{n}".encode(), b"old") for n in range(6)])
    seen = []

    async def collect():
        async for batch in event_log.tail(topic, from_beginning=True):
            seen.extend(batch)
            if len(seen) >= 9:
                return

    task = asyncio.create_task(collect())
    await asyncio.sleep(0.3)
    await event_log.append_many([OutgoingRecord(topic, f"t{n}".encode(), b"new") for n in range(3)])
    await asyncio.wait_for(task, TAIL_TIMEOUT_S)
    assert sorted(r.value for r in seen) == [b"new"] * 3 + [b"old"] * 6


async def test_tail_from_the_end_sees_only_new_records(event_log):
    topic = event_log.topics.balances
    await event_log.append_many([OutgoingRecord(topic, b"acme", b"before")])
    seen = []
    started = asyncio.Event()

    async def collect():
        iterator = event_log.tail(topic, from_beginning=False).__aiter__()
        started.set()
        batch = await iterator.__anext__()
        seen.extend(batch)
        await iterator.aclose()

    task = asyncio.create_task(collect())
    await started.wait()
    await asyncio.sleep(1.0)  # the tail has taken its position at the end
    await event_log.append_many([OutgoingRecord(topic, b"acme", b"after")])
    await asyncio.wait_for(task, TAIL_TIMEOUT_S)
    assert [r.value for r in seen] == [b"after"]


async def test_records_are_durable_for_a_second_reader(event_log, tmp_path):
    topic = event_log.topics.entries
    positions = await event_log.append_many(
        [OutgoingRecord(topic, b"acme", f"v{n}".encode()) for n in range(5)]
    )
    partition = positions[0].partition
    if isinstance(event_log, KafkaLog):
        other = KafkaLog(
            event_log.settings.model_copy(update={"spool_path": tmp_path / "second-spool.sqlite3"})
        )
    else:
        other = PostgresLog(event_log.engine, event_log.settings)
    await other.start()
    try:
        records = await other.read(topic, partition, 0, 100)
    finally:
        await other.stop()
    assert [r.value for r in records][-5:] == [f"v{n}".encode() for n in range(5)]
    assert [r.offset for r in records] == list(range(len(records)))


async def test_a_cancelled_tail_stops_cleanly(event_log):
    async def follow():
        async for _ in event_log.tail(event_log.topics.balances, from_beginning=False):
            pass

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.5)  # waiting for records that do not come
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await event_log.end_offset(event_log.topics.balances, 0) >= 0, "the log still answers"
