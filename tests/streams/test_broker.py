"""The real broker: it answers, topics are created as declared, records round-trip by tenant key."""

from __future__ import annotations

from collections import defaultdict

import pytest

from ledger.codec import decode_event
from scripts.kafka_local import BrokerAddress, probe_metadata
from streams.producer import EventProducer
from streams.settings import DAY_MS
from streams.topics import (
    LedgerTopics,
    TopicSetupError,
    TopicSpec,
    describe_partition_counts,
    describe_topic_configs,
    ensure_topics,
    ledger_topic_specs,
)
from tests.streams.helpers import create_ledger_topics, grant_event, read_topic, stream_settings, usage_event

pytestmark = pytest.mark.kafka


def test_broker_answers_a_metadata_request(kafka_broker):
    host, port = kafka_broker.bootstrap.rsplit(":", 1)
    brokers = probe_metadata(BrokerAddress(host=host, port=int(port), controller_port=0))
    assert len(brokers) == 1
    assert brokers[0][2] == int(port)


async def test_ensure_topics_creates_the_declared_topics_once(kafka_broker, topic_prefix, tmp_path):
    settings = stream_settings(kafka_broker.bootstrap, topic_prefix, tmp_path, topic_partitions=4)
    specs = ledger_topic_specs(settings)
    names = LedgerTopics.from_settings(settings)

    created = await ensure_topics(kafka_broker.bootstrap, specs)
    assert sorted(created) == sorted(
        [names.events, names.entries, names.balances, names.dlq, names.keys, names.checkpoints, names.alerts]
    )
    assert await ensure_topics(kafka_broker.bootstrap, specs) == []

    counts = await describe_partition_counts(kafka_broker.bootstrap, created)
    assert counts == {name: 4 for name in created}
    configs = await describe_topic_configs(kafka_broker.bootstrap, created)
    assert configs[names.events]["retention.ms"] == "-1"
    assert configs[names.events]["cleanup.policy"] == "delete"
    assert configs[names.entries]["retention.ms"] == "-1"
    assert configs[names.balances]["cleanup.policy"] == "compact"
    assert configs[names.dlq]["cleanup.policy"] == "delete"
    assert configs[names.dlq]["retention.ms"] == str(30 * DAY_MS)
    assert configs[names.keys]["cleanup.policy"] == "compact"


async def test_ensure_topics_refuses_an_existing_topic_with_other_partitions(kafka_broker, unique_topic):
    name = unique_topic("mismatch")
    await ensure_topics(kafka_broker.bootstrap, [TopicSpec(name, partitions=2, replication_factor=1)])
    with pytest.raises(TopicSetupError, match="has 2 partitions, declared 3"):
        await ensure_topics(kafka_broker.bootstrap, [TopicSpec(name, partitions=3, replication_factor=1)])


async def test_events_round_trip_keyed_by_tenant(kafka_broker, topic_prefix, tmp_path):
    settings = stream_settings(kafka_broker.bootstrap, topic_prefix, tmp_path)
    await create_ledger_topics(settings)
    tenants = [f"tenant-{number}" for number in range(12)]
    events = [grant_event(tenant, run=topic_prefix) for tenant in tenants]
    events += [usage_event(tenant, index, run=topic_prefix) for index in range(5) for tenant in tenants]

    async with EventProducer(settings) as producer:
        receipts = await producer.publish_many(events)
        assert not any(receipt.spooled for receipt in receipts)
        assert producer.spooled_count() == 0

    records = await read_topic(
        kafka_broker.bootstrap, settings.topic_prefix + "ledger.events", 3, len(events)
    )
    assert sorted(decode_event(record.value).event_id for record in records) == sorted(
        e.event_id for e in events
    )
    partitions_by_tenant = defaultdict(set)
    offsets_by_tenant = defaultdict(list)
    for record in records:
        event = decode_event(record.value)
        assert record.key == event.tenant_id.encode()
        partitions_by_tenant[event.tenant_id].add(record.partition)
        offsets_by_tenant[event.tenant_id].append((record.partition, record.offset, event.event_id))
    assert all(len(partitions) == 1 for partitions in partitions_by_tenant.values()), (
        "a tenant spans partitions"
    )
    assert len(set().union(*partitions_by_tenant.values())) > 1, "all tenants landed on one partition"
    for tenant in tenants:  # one producer, one partition per tenant: the send order is kept
        in_offset_order = [event_id for _, _, event_id in sorted(offsets_by_tenant[tenant])]
        assert in_offset_order == [e.event_id for e in events if e.tenant_id == tenant]


async def test_restarted_broker_keeps_its_data(restartable_kafka_broker, topic_prefix, tmp_path):
    broker = restartable_kafka_broker
    settings = stream_settings(broker.bootstrap, topic_prefix, tmp_path)
    await create_ledger_topics(settings)
    events = [usage_event("tenant-a", index, run=topic_prefix) for index in range(10)]
    async with EventProducer(settings) as producer:
        await producer.publish_many(events)
    broker.stop()
    broker.start()
    records = await read_topic(broker.bootstrap, settings.topic_prefix + "ledger.events", 3, len(events))
    assert [decode_event(record.value).event_id for record in records] == [event.event_id for event in events]
