"""The audit replay on a real broker: in one process and shared among worker processes it rebuilds the
same tenants as the pure fold over the accepted events, and rejects what the processor rejects.

`ledger.events` stamps each record with the broker's append time (LogAppendTime), whatever time the
producer puts on it, so the late records are produced after a pause and the replay's time filter cuts at
the broker's stamps."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer
from typer.testing import CliRunner

from ledger.codec import encode_event
from ledger.events import CreditGranted, GrantVoided, UsageRecorded
from ledger.tenant import Book
from streams.replay import replay
from streams.topics import LedgerTopics, describe_topic_configs
from tests.streams.helpers import create_ledger_topics, stream_settings
from tollgate import cli

pytestmark = pytest.mark.kafka

PRODUCER_STAMP_MS = 1_000  # the time the producer puts on every record: the broker replaces it
LATE_PAUSE_S = 0.05  # between the last on-time record and the late ones: distinct append milliseconds


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


async def produce(
    settings, events: list, rejected: list[tuple[bytes | None, bytes]], late: list
) -> tuple[int, int, int]:
    """Produce; return (records, the latest append time of the on-time ones, the late ones' first)."""
    topic = LedgerTopics.from_settings(settings).events
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        on_time = [
            await producer.send_and_wait(
                topic, encode_event(event), key=event.tenant_id.encode(), timestamp_ms=PRODUCER_STAMP_MS
            )
            for event in events
        ]
        on_time += [
            await producer.send_and_wait(topic, value, key=key, timestamp_ms=PRODUCER_STAMP_MS)
            for key, value in rejected
        ]
        await asyncio.sleep(LATE_PAUSE_S)
        late_sent = [
            await producer.send_and_wait(
                topic, encode_event(event), key=event.tenant_id.encode(), timestamp_ms=PRODUCER_STAMP_MS
            )
            for event in late
        ]
    finally:
        await producer.stop()
    on_time_end = max(metadata.timestamp for metadata in on_time)
    late_start = min(metadata.timestamp for metadata in late_sent)
    assert on_time_end > PRODUCER_STAMP_MS, "the broker's append time replaces the producer's"
    assert late_start > on_time_end, "the late records were appended after a pause"
    return len(on_time) + len(late_sent), on_time_end, late_start


async def test_replay_in_one_process_and_in_workers_equals_the_pure_fold(
    kafka_broker, topic_prefix, tmp_path, monkeypatch
):
    settings = stream_settings(kafka_broker.bootstrap, topic_prefix, tmp_path)
    await create_ledger_topics(settings)
    events_topic = LedgerTopics.from_settings(settings).events
    configs = await describe_topic_configs(kafka_broker.bootstrap, [events_topic])
    assert configs[events_topic]["message.timestamp.type"] == "LogAppendTime"
    events = accepted_events()
    rejected = [
        (b"acme", b"{not json"),
        (b"globex", encode_event(usage("acme", 999, 500, 1))),  # key is not its tenant
        (b"nobody", encode_event(usage("nobody", 0, 500, 1))),  # usage for a tenant without a grant
    ]
    late = [usage("acme", 1000, 800, 50)]
    produced, on_time_end, late_start = await produce(settings, events, rejected, late)

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
    assert in_one.as_of["acme"] == late_start  # the latest record time folded

    before_late = await replay(settings, until_time_ms=on_time_end, workers=2)
    assert before_late.as_of["acme"] <= on_time_end < late_start
    assert before_late.balance_at("acme", 801)[0] == in_one.balance_at("acme", 801)[0] + 50

    # `tollgate ledger replay --as-known-at K` from the command line: the tenants as the log knew them at K
    monkeypatch.setenv("TOLLGATE_KAFKA_BOOTSTRAP_SERVERS", kafka_broker.bootstrap)
    monkeypatch.setenv("TOLLGATE_TOPIC_PREFIX", topic_prefix)
    monkeypatch.setenv("TOLLGATE_TOPIC_PARTITIONS", str(settings.topic_partitions))
    for known, result in ((on_time_end, before_late), (None, in_one)):
        args = ["ledger", "replay", *([] if known is None else ["--as-known-at", str(known)])]
        printed = await asyncio.to_thread(CliRunner().invoke, cli.app, args)
        assert printed.exit_code == 0, printed.output
        rows = {cells[0]: cells[1:] for cells in table_rows(printed.output)}
        for balance in result.balances(at=known):
            assert rows[balance.tenant_id][:2] == [str(balance.balance), str(balance.overage)], printed.output
        assert f"{result.records} records" in printed.output


def table_rows(output: str) -> list[list[str]]:
    """The cells of a rich table's body rows."""
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in output.splitlines()
        if line.strip().startswith("│")
    ]
