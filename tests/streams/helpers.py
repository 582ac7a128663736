"""Shared helpers for the stream tests: ledger events to publish, and reading a topic back."""

from __future__ import annotations

import time
from collections import defaultdict

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from ledger.events import CreditGranted, UsageRecorded
from streams.settings import StreamSettings
from streams.topics import LedgerTopics, ensure_topics, ledger_topic_specs

READ_TIMEOUT_S = 60.0
FETCH_TIMEOUT_MS = 500


def usage_event(tenant_id: str, index: int, *, run: str) -> UsageRecorded:
    return UsageRecorded(
        event_id=f"{run}-usage-{tenant_id}-{index}",
        tenant_id=tenant_id,
        amount=10 + index,
        occurred_at=1_700_000_000_000 + index,
        model="tollgate-tiny",
        prompt_tokens=3,
        completion_tokens=7,
    )


def grant_event(tenant_id: str, *, run: str) -> CreditGranted:
    return CreditGranted(
        event_id=f"{run}-grant-{tenant_id}",
        tenant_id=tenant_id,
        grant_id=f"{run}-grant-{tenant_id}",
        amount=1_000_000,
        effective_at=1_600_000_000_000,
    )


def after_first_grants(events, stream: list) -> list:
    """`stream` preceded by each tenant's first grant in `events` (a repeat of it later changes nothing): on
    the log, usage never precedes its tenant's first grant (admission needs credit), and the processor
    dead-letters usage for a tenant it has no grant for."""
    firsts: dict[str, CreditGranted] = {}
    for event in events:
        if isinstance(event, CreditGranted):
            firsts.setdefault(event.tenant_id, event)
    return [*firsts.values(), *stream]


def stream_settings(bootstrap: str, topic_prefix: str, tmp_path, **overrides) -> StreamSettings:
    values = dict(
        kafka_bootstrap_servers=bootstrap,
        topic_prefix=topic_prefix,
        topic_partitions=3,
        spool_path=tmp_path / "spool.sqlite3",
        publish_ack_timeout_ms=1_500,
        producer_request_timeout_ms=3_000,
        producer_close_timeout_ms=2_000,
        resend_backoff_initial_ms=100,
        resend_backoff_max_ms=1_000,
    )
    values.update(overrides)
    return StreamSettings(**values)


async def create_ledger_topics(settings: StreamSettings) -> None:
    await ensure_topics(settings.kafka_bootstrap_servers, ledger_topic_specs(settings))


async def read_topic(
    bootstrap: str, topic: str, partition_count: int, expected_count: int, *, quiet_s: float = 1.0
) -> list[ConsumerRecord]:
    """Every record on `topic` from the start: waits for `expected_count`, then `quiet_s` more for extras."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, partition) for partition in range(partition_count)])
        await consumer.seek_to_beginning()
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + READ_TIMEOUT_S
        quiet_until = None
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS)
            for batch in batches.values():
                records.extend(batch)
            if len(records) >= expected_count:
                quiet_until = quiet_until or time.monotonic() + quiet_s
                if time.monotonic() >= quiet_until:
                    break
        return records
    finally:
        await consumer.stop()


async def assert_entries_complete_and_consistent(settings, events) -> None:
    """Every usage event has its allocation; an entry id seen twice carries the same entry both times."""
    topics = LedgerTopics.from_settings(settings)
    entries = await read_topic(
        settings.kafka_bootstrap_servers, topics.entries, settings.topic_partitions, 1, quiet_s=2
    )
    by_id = defaultdict(set)
    for record in entries:
        entry = msgspec.json.decode(record.value)
        by_id[entry.get("entry_id") or entry["event_id"]].add(
            record.value
        )  # credit_expired calls it event_id
    assert all(len(copies) == 1 for copies in by_id.values()), (
        "a repeated entry id must repeat the same entry"
    )
    usage_ids = {entry_id for entry_id in by_id if "/usage/" in entry_id}
    assert usage_ids == {f"{e.tenant_id}/usage/{e.event_id}" for e in events if isinstance(e, UsageRecorded)}
