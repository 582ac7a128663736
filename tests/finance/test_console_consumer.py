"""The README's finance consumer, run as written against the local broker: the broker's own
kafka-console-consumer reads `ledger.entries` and every record validates against
schemas/ledger.entries.schema.json (python -m tollgate.schemas validate). The records are what the
processor publishes (LedgerProcessor's output, hash-chain link included)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from ledger.codec import encode_event
from ledger.events import CreditGranted, GrantVoided, UsageRecorded
from streams.batch_processor import PartitionedState
from streams.processor import LedgerProcessor
from streams.records import LogRecord
from streams.topics import TopicSpec, ensure_topics

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]
CONSUMER_TIMEOUT_S = 240


def published_entries() -> list[bytes]:
    events = [
        CreditGranted(
            event_id="grant-1",
            tenant_id="acme",
            grant_id="g-1",
            amount=1_000,
            effective_at=0,
            expires_at=5_000,
            category="paid",
            price=5_000,
            currency="USD",
            reference="INV-1",
        ),
        *[
            UsageRecorded(event_id=f"u{n}", tenant_id="acme", amount=70, occurred_at=100 + n, model="tiny")
            for n in range(5)
        ],
        CreditGranted(event_id="grant-2", tenant_id="acme", grant_id="g-2", amount=50, effective_at=0),
        GrantVoided(event_id="void-2", tenant_id="acme", grant_id="g-2", voided_at=6_000),
        UsageRecorded(event_id="late", tenant_id="acme", amount=20, occurred_at=50, model="tiny"),
    ]
    processor = LedgerProcessor(PartitionedState(), source_topic="ledger.events")
    records = [
        LogRecord("ledger.events", 0, offset, b"acme", encode_event(event), 7_000)
        for offset, event in enumerate(events)
    ]
    return [record.value for record in processor.process(0, records).entries]


async def test_the_readme_consumer_validates_what_the_processor_publishes(kafka_broker, unique_topic):
    topic = unique_topic("entries")
    await ensure_topics(kafka_broker.bootstrap, [TopicSpec(topic, partitions=1, replication_factor=1)])
    values = published_entries()
    assert len(values) >= 8
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=b"acme")
    finally:
        await producer.stop()
    # The README's command, with the test's broker and topic and a bound on the messages.
    command = (
        f"scripts/kafka-console-consumer --bootstrap-server {kafka_broker.bootstrap} --topic {topic} "
        f"--from-beginning --max-messages {len(values)} --timeout-ms 60000 "
        "| .venv/bin/python -m tollgate.schemas validate ledger.entries"
    )
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CONSUMER_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{len(values)} valid ledger.entries records"


def test_a_record_that_does_not_match_the_schema_is_refused():
    good = published_entries()[0].decode()
    bad = good.replace('"amount":1000', '"amount":"1000"')
    result = subprocess.run(
        [str(REPO / ".venv/bin/python"), "-m", "tollgate.schemas", "validate", "ledger.entries"],
        input=good + "\n" + bad + "\n", cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1 and "line 2" in result.stderr, result.stdout + result.stderr
