"""EventProducer against the real broker: acks, and the spool when the broker is stopped or killed."""

from __future__ import annotations

from collections import Counter

import pytest

from ledger.codec import decode_event
from streams.producer import EventProducer, PublishRejected
from streams.spool import SpoolFull
from tests.fixtures.kafka import broker_down
from tests.streams.helpers import create_ledger_topics, read_topic, stream_settings, usage_event

pytestmark = pytest.mark.kafka

DRAIN_TIMEOUT_MS = 60_000
UNREACHABLE_BOOTSTRAP = "127.0.0.1:9"  # the discard port: nothing listens there


def event_ids_on_topic(records) -> Counter:
    return Counter(decode_event(record.value).event_id for record in records)


async def test_publish_returns_the_broker_ack(kafka_broker, topic_prefix, tmp_path):
    settings = stream_settings(kafka_broker.bootstrap, topic_prefix, tmp_path)
    await create_ledger_topics(settings)
    async with EventProducer(settings) as producer:
        receipt = await producer.publish(usage_event("tenant-a", 0, run=topic_prefix))
        assert not receipt.spooled
        assert receipt.topic == topic_prefix + "ledger.events"
        assert receipt.offset == 0
        derived = await producer.send(topic_prefix + "ledger.balances", b"tenant-a", b'{"balance":5}')
        assert not derived.spooled
        assert producer.spooled_count() == 0


@pytest.mark.slow
@pytest.mark.parametrize("crash", [True, False], ids=["killed", "stopped"])
async def test_events_published_while_the_broker_is_down_arrive_exactly_once(
    restartable_kafka_broker, topic_prefix, tmp_path, crash
):
    broker = restartable_kafka_broker
    settings = stream_settings(broker.bootstrap, topic_prefix, tmp_path)
    await create_ledger_topics(settings)
    before = [usage_event(f"tenant-{index % 5}", index, run=topic_prefix) for index in range(10)]
    during = [usage_event(f"tenant-{index % 5}", index, run=topic_prefix) for index in range(10, 70)]

    async with EventProducer(settings) as producer:
        assert not any(receipt.spooled for receipt in await producer.publish_many(before))
        with broker_down(broker, crash=crash):
            # the first publish finds the client still connected: it times out while the client holds it
            first = await producer.publish(during[0])
            rest = [await producer.publish(event) for event in during[1:]]
            assert first.spooled and all(receipt.spooled for receipt in rest)
            assert producer.spooled_count() == len(during)
        assert await producer.wait_until_drained(DRAIN_TIMEOUT_MS)
        assert producer.spooled_count() == 0
        after = await producer.publish(usage_event("tenant-0", 70, run=topic_prefix))
        assert not after.spooled

    sent = before + during + [usage_event("tenant-0", 70, run=topic_prefix)]
    records = await read_topic(broker.bootstrap, topic_prefix + "ledger.events", 3, len(sent))
    assert event_ids_on_topic(records) == Counter(event.event_id for event in sent)  # each id exactly once


@pytest.mark.slow
async def test_spool_outlives_the_producer_and_drains_on_the_next_start(
    restartable_kafka_broker, topic_prefix, tmp_path
):
    broker = restartable_kafka_broker
    settings = stream_settings(broker.bootstrap, topic_prefix, tmp_path)
    await create_ledger_topics(settings)
    events = [usage_event(f"tenant-{index % 4}", index, run=topic_prefix) for index in range(40)]

    with broker_down(broker, crash=True):
        async with EventProducer(settings) as producer:  # starts with the broker away: spools from the start
            receipts = await producer.publish_many(events)
            assert all(receipt.spooled for receipt in receipts)
            assert producer.spooled_count() == len(events)

    async with EventProducer(settings) as producer:
        assert producer.spooled_count() == len(events)
        assert await producer.wait_until_drained(DRAIN_TIMEOUT_MS)

    records = await read_topic(broker.bootstrap, topic_prefix + "ledger.events", 3, len(events))
    assert event_ids_on_topic(records) == Counter(event.event_id for event in events)
    by_tenant = {}
    for record in sorted(records, key=lambda record: (record.partition, record.offset)):
        event = decode_event(record.value)
        by_tenant.setdefault(event.tenant_id, []).append(event.event_id)
    for tenant, event_ids in by_tenant.items():  # resent oldest first
        assert event_ids == [event.event_id for event in events if event.tenant_id == tenant]


async def test_full_spool_raises_and_takes_nothing(tmp_path):
    settings = stream_settings(UNREACHABLE_BOOTSTRAP, "unused.", tmp_path, spool_size_max_bytes=2_000)
    async with EventProducer(settings) as producer:
        accepted = 0
        with pytest.raises(SpoolFull, match="spool_size_max_bytes=2000"):
            for index in range(100):
                await producer.publish(usage_event("tenant-a", index, run="full"))
                accepted += 1
        assert 0 < accepted < 100
        assert producer.spooled_count() == accepted


async def test_a_record_the_broker_can_never_take_is_rejected_not_spooled(
    kafka_broker, topic_prefix, tmp_path
):
    settings = stream_settings(kafka_broker.bootstrap, topic_prefix, tmp_path)
    await create_ledger_topics(settings)
    async with EventProducer(settings) as producer:
        with pytest.raises(PublishRejected, match="MessageSizeTooLarge"):
            await producer.send(topic_prefix + "ledger.dlq", b"tenant-a", b"x" * 2_000_000)
        assert producer.spooled_count() == 0
        assert not (await producer.publish(usage_event("tenant-a", 0, run=topic_prefix))).spooled
