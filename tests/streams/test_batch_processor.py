"""The batch engine on a real broker: a batch the broker does not acknowledge is retried from the committed
offsets, and a processor killed beside another one has its partitions taken over with nothing lost."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import defaultdict

import msgspec
import pytest

from ledger.events import CreditGranted
from streams.batch_processor import READY_LOG_LINE, BatchProcessor, PartitionedState, changelog_topic
from streams.processor_settings import ProcessorSettings
from streams.producer import BrokerUnavailable, EventProducer, PartitionedRecord, PublishRejected
from streams.replay import compare, live_balances, replay
from streams.topics import LedgerTopics
from tests.fixtures.processes import ComponentProcess
from tests.streams.helpers import (
    after_first_grants,
    assert_entries_complete_and_consistent,
    create_ledger_topics,
    read_topic,
    stream_settings,
)
from tests.streams.test_kafka_processors import converged, ledger_events, processor_env, wait_converged

pytestmark = pytest.mark.kafka

CONVERGE_TIMEOUT_S = 90
READY_TIMEOUT_S = 60
UNREACHABLE_BOOTSTRAP = "127.0.0.1:9"
BROKER_MESSAGE_MAX_BYTES = 1024 * 1024  # Kafka's default message.max.bytes (about 1 MiB)


def processor_settings(settings, tmp_path, **overrides) -> ProcessorSettings:
    return ProcessorSettings(
        **{**settings.model_dump(), "spool_path": tmp_path / "processor-spool.sqlite3"},
        processor_app_id=settings.topic_prefix + "ledger",
        processor_batch_max=50,
        processor_commit_interval_ms=10,
        processor_retry_backoff_initial_ms=50,
        **overrides,
    )


def test_partitioned_state_keeps_each_partition_apart():
    state = PartitionedState()
    state.put(0, b"a/acme", b"1")
    state.put(1, b"a/globex", b"2")
    state.put(1, b"s/globex/1", b"3")
    assert dict(state.items_with_prefix(b"a/")) == {b"a/acme": b"1", b"a/globex": b"2"}
    state.put(1, b"s/globex/1", None)  # a compacted topic's tombstone
    assert state.get(b"s/globex/1") is None
    state.drop(1)
    assert state.get(b"a/globex") is None and state.get(b"a/acme") == b"1" and len(state) == 1


async def test_send_partitioned_lands_in_order_on_the_named_partitions(kafka_broker, topic_prefix, tmp_path):
    settings = stream_settings(kafka_broker.bootstrap, topic_prefix, tmp_path, producer_batch_size_bytes=4096)
    await create_ledger_topics(settings)
    topic = LedgerTopics.from_settings(settings).entries
    records = [PartitionedRecord(topic, n % 3, b"key-%d" % n, b"%06d" % n + b"x" * 200) for n in range(300)]
    async with EventProducer(settings) as producer:
        await producer.send_partitioned(records)  # several record batches per partition at 4 KiB each
        # a record above the batch size goes in a batch of its own; one above the broker's limit is refused
        await producer.send_partitioned([PartitionedRecord(topic, 0, b"k", b"%06d" % 300 + b"x" * 10_000)])
        with pytest.raises(PublishRejected):
            await producer.send_partitioned(
                [PartitionedRecord(topic, 0, b"k", b"x" * BROKER_MESSAGE_MAX_BYTES * 2)]
            )
    landed = await read_topic(settings.kafka_bootstrap_servers, topic, 3, expected_count=301, quiet_s=1)
    by_partition = defaultdict(list)
    for record in landed:
        by_partition[record.partition].append(int(record.value[:6]))
    assert dict(by_partition) == {p: list(range(p, 300, 3)) + ([300] if p == 0 else []) for p in range(3)}


async def test_send_partitioned_raises_when_the_broker_is_away(tmp_path):
    settings = stream_settings(UNREACHABLE_BOOTSTRAP, "unused.", tmp_path, producer_request_timeout_ms=500)
    async with EventProducer(settings) as producer:
        with pytest.raises(BrokerUnavailable):
            await producer.send_partitioned([PartitionedRecord("ledger.entries", 0, b"k", b"v")])


async def test_unacknowledged_batches_are_retried_from_the_committed_offsets(
    kafka_broker, topic_prefix, tmp_path
):
    """Fault injection: one output publish fails before anything is sent; one state write reaches the broker
    but its acknowledgement is lost. Both batches are folded again from the committed offsets."""
    settings = processor_settings(stream_settings(kafka_broker.bootstrap, topic_prefix, tmp_path), tmp_path)
    await create_ledger_topics(settings)
    events = ledger_events(int(time.time() * 1000), usage_per_tenant=300)
    stream = events + random.Random(5).sample(events, 100)
    random.Random(6).shuffle(stream)
    stream = after_first_grants(events, stream)

    engine = BatchProcessor(settings)
    send = engine.producer.send_partitioned
    injected: list[str] = []

    async def flaky_send(records):
        is_state = records[0].topic == changelog_topic(settings)
        if not is_state and not injected:
            injected.append("outputs")
            raise BrokerUnavailable("injected: outputs not sent")
        if is_state and injected == ["outputs"]:
            await send(records)
            injected.append("state")
            raise BrokerUnavailable("injected: state written, acknowledgement lost")
        await send(records)

    engine.producer.send_partitioned = flaky_send
    await engine.start()
    stop = asyncio.Event()
    running = asyncio.create_task(engine.run(stop))
    try:
        async with EventProducer(
            settings.model_copy(update={"spool_path": tmp_path / "publisher.sqlite3"})
        ) as producer:
            for start in range(0, len(stream), 100):
                await producer.publish_many(stream[start : start + 100])
        deadline = time.monotonic() + CONVERGE_TIMEOUT_S
        while not await converged(settings, events):
            assert not running.done(), running.exception()
            assert time.monotonic() < deadline, "balances did not converge"
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 30)
        await engine.stop()
    assert injected == ["outputs", "state"]
    await assert_entries_complete_and_consistent(settings, events)
    assert compare(await replay(settings), await live_balances(settings)) == []


@pytest.mark.slow
async def test_a_killed_processor_partitions_move_to_the_other_one(kafka_broker, topic_prefix, tmp_path):
    settings = stream_settings(kafka_broker.bootstrap, topic_prefix, tmp_path, topic_partitions=6)
    await create_ledger_topics(settings)
    events = ledger_events(int(time.time() * 1000), usage_per_tenant=400)
    stream = events + random.Random(7).sample(events, 100)
    random.Random(8).shuffle(stream)
    stream = after_first_grants(events, stream)
    env = {
        **processor_env(settings, tmp_path),
        "TOLLGATE_PROCESSOR_SESSION_TIMEOUT_MS": "6000",  # the broker's group.min.session.timeout.ms,
        "TOLLGATE_PROCESSOR_HEARTBEAT_INTERVAL_MS": "500",
    }
    processors = [
        ComponentProcess(
            "streams.batch_processor",
            {**env, "TOLLGATE_SPOOL_PATH": str(tmp_path / f"spool-{n}.sqlite3")},
            tmp_path / f"processor-{n}.log",
        )
        for n in (1, 2)
    ]
    try:
        for processor in processors:
            processor.start()
            processor.wait_for_log(READY_LOG_LINE, READY_TIMEOUT_S)
        for processor in processors:  # both in the group, each with some partitions
            processor.wait_for_log("assigned [", READY_TIMEOUT_S)
        async with EventProducer(
            settings.model_copy(update={"spool_path": tmp_path / "publisher.sqlite3"})
        ) as producer:
            await producer.publish_many(stream[:700])
            await asyncio.sleep(0.5)
            survivor_log_at_kill = processors[0].log_path.stat().st_size
            processors[1].kill()
            await producer.publish_many(stream[700:])
        await wait_converged(settings, events, processors[0])
    finally:
        for processor in processors:
            processor.stop()
    after_kill = processors[0].log_path.read_bytes()[survivor_log_at_kill:]
    assert b"assigned [0, 1, 2, 3, 4, 5]" in after_kill, "the survivor should have taken every partition"
    await assert_entries_complete_and_consistent(settings, events)
    assert compare(await replay(settings), await live_balances(settings)) == []


async def test_the_sweep_publishes_the_expiry_of_a_quiet_tenant_once(kafka_broker, topic_prefix, tmp_path):
    settings = processor_settings(
        stream_settings(kafka_broker.bootstrap, topic_prefix, tmp_path),
        tmp_path,
        processor_expiry_grace_ms=0,
        processor_expiry_sweep_interval_ms=100,
    )
    await create_ledger_topics(settings)
    topics = LedgerTopics.from_settings(settings)
    now = int(time.time() * 1000)
    grant = CreditGranted(
        event_id="g",
        tenant_id="quiet",
        grant_id="g",
        amount=40,
        effective_at=now - 1_000,
        expires_at=now + 1_500,
    )
    engine = BatchProcessor(settings)
    await engine.start()
    stop = asyncio.Event()
    running = asyncio.create_task(engine.run(stop))
    try:
        async with EventProducer(
            settings.model_copy(update={"spool_path": tmp_path / "publisher.sqlite3"})
        ) as producer:
            await producer.publish(grant)  # and nothing after it: only wall-clock time can expire the block
        deadline = time.monotonic() + CONVERGE_TIMEOUT_S
        while (await live_balances(settings)).get("quiet") is None or (await live_balances(settings))[
            "quiet"
        ].balance:
            assert not running.done(), running.exception()
            assert time.monotonic() < deadline, "the expiry was not published"
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # several more sweeps
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        await engine.stop()
    entries = await read_topic(
        settings.kafka_bootstrap_servers, topics.entries, settings.topic_partitions, 1, quiet_s=1
    )
    expired = [msgspec.json.decode(r.value) for r in entries if b"credit_expired" in r.value]
    assert [(entry["grant_id"], entry["amount"]) for entry in expired] == [("g", 40)]
    assert time.time() * 1000 >= grant.expires_at
