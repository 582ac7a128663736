"""The projector over a real broker: killed in the middle of a batch, it resumes with no gap and no
duplicate, because its offsets commit in the same transaction as its rows."""

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import defaultdict

import msgspec
import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from ledger.codec import encode_event
from ledger.entries import encode_entry
from ledger.events import CreditGranted, UsageRecorded
from ledger.tenant import TenantLedger
from streams.projector import Projector, ProjectorSettings, stored_offsets
from streams.settings import StreamSettings
from streams.topics import LedgerTopics, ensure_topics, ledger_topic_specs
from tests.storage.dead_letters import RecordingDeadLetters

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

PARTITIONS = 3
TENANTS = 6
BATCH_MAX = 10
STEPS_MAX = 200  # a bound on the resume loop, far above the ~15 batches it needs


class SimulatedCrash(Exception):
    pass


def ledger_records(topics: LedgerTopics) -> list[tuple[str, bytes, bytes]]:
    """(topic, key, value) for events, the entries the fold derives from them, and balance records."""
    records = []
    for tenant_number in range(TENANTS):
        tenant_id = f"tenant-{tenant_number}"
        ledger = TenantLedger(tenant_id)
        events = [
            CreditGranted(
                event_id=f"{tenant_id}/g",
                tenant_id=tenant_id,
                grant_id="g",
                amount=1_000,
                effective_at=0,
                expires_at=10_000,
            )
        ]
        events += [
            UsageRecorded(
                event_id=f"{tenant_id}/r{n}", tenant_id=tenant_id, amount=7, occurred_at=100 + n, model="m"
            )
            for n in range(12)
        ]
        for event in events:
            records.append((topics.events, tenant_id.encode(), encode_event(event)))
            for entry in ledger.apply(event):
                records.append((topics.entries, tenant_id.encode(), encode_entry(entry)))
        balance = {
            "tenant_id": tenant_id,
            "balance": ledger.balance_at(200),
            "overage": 0,
            "as_of": 200,
            "applied_offset": 0,
        }
        records.append((topics.balances, tenant_id.encode(), msgspec.json.encode(balance)))
    return records


async def produce(bootstrap: str, records) -> dict[tuple[str, int], int]:
    """Send the records; return each partition's end offset."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        ends: dict[tuple[str, int], int] = defaultdict(int)
        for topic, key, value in records:
            metadata = await producer.send_and_wait(topic, value, key=key)
            ends[(topic, metadata.partition)] = max(ends[(topic, metadata.partition)], metadata.offset + 1)
        return dict(ends)
    finally:
        await producer.stop()


@pytest.fixture
async def ledger_topics(kafka_broker) -> tuple[str, LedgerTopics]:
    prefix = f"projector-{uuid.uuid4().hex[:8]}."
    settings = StreamSettings(topic_prefix=prefix, topic_partitions=PARTITIONS)
    await ensure_topics(kafka_broker.bootstrap, ledger_topic_specs(settings))
    return prefix, LedgerTopics.from_settings(settings)


def projector(kafka_broker, topics, session_factory, before_commit=None) -> Projector:
    return Projector(
        settings=ProjectorSettings(name="crash-test", batch_records_max=BATCH_MAX, poll_timeout_ms=200),
        topics=topics,
        bootstrap_servers=kafka_broker.bootstrap,
        session_factory=session_factory,
        dead_letter_log=RecordingDeadLetters(),
        before_commit=before_commit,
    )


def archived_offsets(database_url: str) -> dict[tuple[str, int], list[int]]:
    """Source offsets of every archived event and entry row, per partition, sorted."""
    offsets = defaultdict(list)
    with psycopg.connect(database_url) as connection:
        for table in ("ledger_entries", "ledger_events"):
            rows = connection.execute(
                f"SELECT source_topic, source_partition, source_offset FROM {table} WHERE event_type <> 'credit_expired'"  # noqa: E501
                if table == "ledger_events"
                else f"SELECT source_topic, source_partition, source_offset FROM {table}"
            )
            for topic, partition, offset in rows:
                offsets[(topic, partition)].append(offset)
    return {key: sorted(values) for key, values in offsets.items()}


async def assert_state_matches_offsets(session_factory, database_url, topics) -> dict[tuple[str, int], int]:
    """Every row up to each stored offset is there exactly once, and nothing beyond it."""
    async with session_factory() as session:
        stored = await stored_offsets(session, "crash-test")
    archived = archived_offsets(database_url)
    for (topic, partition), next_offset in stored.items():
        if topic != topics.balances:
            assert archived.get((topic, partition), []) == list(range(next_offset)), (topic, partition)
    for key in archived:
        assert key in stored
    return stored


async def resume_to_the_end(kafka_broker, topics, session_factory, ends) -> Projector:
    async with projector(kafka_broker, topics, session_factory) as resumed:
        for _ in range(STEPS_MAX):
            async with session_factory() as session:
                if await stored_offsets(session, "crash-test") == ends:
                    return resumed
            await resumed.step()
    raise AssertionError(f"the resumed projector did not reach the end offsets in {STEPS_MAX} steps")


async def test_projector_raising_mid_batch_resumes_without_gap_or_duplicate(
    kafka_broker, ledger_topics, session_factory, database_url
):
    _, topics = ledger_topics
    records = ledger_records(topics)
    ends = await produce(kafka_broker.bootstrap, records)
    batches = 0

    async def crash_in_third_batch(batch) -> None:
        nonlocal batches
        batches += 1
        if batches == 3:
            raise SimulatedCrash

    crashing = projector(kafka_broker, topics, session_factory, before_commit=crash_in_third_batch)
    async with crashing:
        with pytest.raises(SimulatedCrash):
            for _ in range(STEPS_MAX):
                await crashing.step()
    committed = await assert_state_matches_offsets(session_factory, database_url, topics)
    assert sum(committed.values()) == crashing.records_projected == 2 * BATCH_MAX

    resumed = await resume_to_the_end(kafka_broker, topics, session_factory, ends)

    assert resumed.records_projected == len(records) - crashing.records_projected
    await assert_state_matches_offsets(session_factory, database_url, topics)


async def test_projector_killed_mid_batch_resumes_without_gap_or_duplicate(
    kafka_broker, ledger_topics, session_factory, database_url
):
    prefix, topics = ledger_topics
    records = ledger_records(topics)
    ends = await produce(kafka_broker.bootstrap, records)

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.storage.projector_child",
        kafka_broker.bootstrap,
        prefix,
        database_url,
        "crash-test",
        str(BATCH_MAX),
        "4",
        cwd=os.getcwd(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(child.communicate(), timeout=120)

    assert child.returncode == -signal.SIGKILL, stderr.decode()
    committed = await assert_state_matches_offsets(session_factory, database_url, topics)
    assert sum(committed.values()) == 3 * BATCH_MAX  # three batches committed, the fourth died uncommitted

    resumed = await resume_to_the_end(kafka_broker, topics, session_factory, ends)

    assert resumed.records_projected == len(records) - 3 * BATCH_MAX
    await assert_state_matches_offsets(session_factory, database_url, topics)
    with psycopg.connect(database_url) as connection:
        balances = connection.execute("SELECT count(*), sum(balance) FROM balances").fetchone()
    assert balances == (TENANTS, TENANTS * (1_000 - 12 * 7))
