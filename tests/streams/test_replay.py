"""The audit replay on a real broker: in one process and shared among worker processes it rebuilds the
same tenants as the pure fold over the accepted events, and rejects what the processor rejects."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaProducer

from ledger.codec import encode_event
from ledger.events import CreditGranted, GrantVoided, UsageRecorded
from ledger.tenant import Book
from streams.replay import replay
from streams.topics import LedgerTopics
from tests.streams.helpers import create_ledger_topics, stream_settings

pytestmark = pytest.mark.kafka

LATE_STAMP_MS = 2_000_000_000_000  # broker time of the records `until_time_ms` leaves out


def usage(tenant_id: str, n: int, occurred_at: int, amount: int) -> UsageRecorded:
    return UsageRecorded(
        event_id=f"u-{tenant_id}-{n}",
        tenant_id=tenant_id,
        amount=amount,
        occurred_at=occurred_at,
        model="m",
        prompt_tokens=1,
        completion_tokens=1,
    )


def accepted_events() -> list:
    tenants = ["acme", "globex", "initech", "umbrella"]
    events: list = []
    for tenant in tenants:
        events.append(
            CreditGranted(
                event_id=f"g-{tenant}",
                tenant_id=tenant,
                grant_id=f"g-{tenant}",
                amount=500,
                effective_at=0,
                expires_at=10_000,
            )
        )
        events.extend(usage(tenant, n, 100 + 37 * n % 900, 3 + n % 5) for n in range(60))
        events.append(
            CreditGranted(
                event_id=f"late-{tenant}",
                tenant_id=tenant,
                grant_id=f"late-{tenant}",
                amount=40,
                effective_at=450,
                priority=-1,
            )
        )  # splits a segment with usage
    events.append(GrantVoided(event_id="v-acme", tenant_id="acme", grant_id="late-acme", voided_at=700))
    events.append(usage("globex", 5, 100 + 37 * 5 % 900, 3))  # a producer resend: a duplicate
    return events


async def produce(settings, events: list, rejected: list[tuple[bytes | None, bytes]], late: list) -> int:
    topic = LedgerTopics.from_settings(settings).events
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        for event in events:
            await producer.send_and_wait(
                topic, encode_event(event), key=event.tenant_id.encode(), timestamp_ms=1_000
            )
        for key, value in rejected:
            await producer.send_and_wait(topic, value, key=key, timestamp_ms=1_000)
        for event in late:
            await producer.send_and_wait(
                topic, encode_event(event), key=event.tenant_id.encode(), timestamp_ms=LATE_STAMP_MS
            )
    finally:
        await producer.stop()
    return len(events) + len(rejected) + len(late)


async def test_replay_in_one_process_and_in_workers_equals_the_pure_fold(
    kafka_broker, topic_prefix, tmp_path
):
    settings = stream_settings(kafka_broker.bootstrap, topic_prefix, tmp_path)
    await create_ledger_topics(settings)
    events = accepted_events()
    rejected = [
        (b"acme", b"{not json"),
        (b"globex", encode_event(usage("acme", 999, 500, 1))),  # key is not its tenant
        (b"nobody", encode_event(usage("nobody", 0, 500, 1))),  # usage for a tenant without a grant
    ]
    late = [usage("acme", 1000, 800, 50)]
    produced = await produce(settings, events, rejected, late)

    expected = Book()
    for event in events + late:
        expected.apply(event)
    in_one = await replay(settings, workers=1)
    in_workers = await replay(settings, workers=2)
    for result in (in_one, in_workers):
        assert result.records == produced and result.dead_letters == len(rejected)
        assert sorted(result.as_of) == sorted(expected.tenants)
        for tenant_id, ledger in expected.tenants.items():
            for t in (0, 99, 450, 451, 700, 701, 801, result.as_of[tenant_id], 20_000):
                assert result.balance_at(tenant_id, t)[0] == ledger.balance_at(t), (tenant_id, t)
    assert in_one.balances() == in_workers.balances()
    assert in_one.as_of["acme"] == LATE_STAMP_MS  # the latest record time folded

    before_late = await replay(settings, until_time_ms=1_000, workers=2)
    assert before_late.as_of["acme"] == 1_000
    assert before_late.balance_at("acme", 801)[0] == in_one.balance_at("acme", 801)[0] + 50
