"""The audit over a real broker and Postgres: the batch engine chains and checkpoints the entries, the
projector writes them, `tollgate audit verify` passes on the untouched ledger and names a changed amount
with exit status 1; `tollgate audit public-key` prints the key the checkpoints verify with."""

from __future__ import annotations

import asyncio
import random

import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import text
from typer.testing import CliRunner

from ledger.events import CreditGranted, UsageRecorded
from streams.audit_verify import verify
from streams.batch_processor import BatchProcessor
from streams.log import KafkaLog
from streams.processor_settings import ProcessorSettings
from streams.producer import EventProducer
from streams.projector import Projector, ProjectorSettings
from streams.topics import LedgerTopics, ensure_topics, ledger_topic_specs
from tests.audit.helpers import KEY
from tests.storage.dead_letters import RecordingDeadLetters
from tollgate.cli import app

TENANTS = ("kafka-acme", "kafka-globex")
USAGE_PER_TENANT = 40
SETTLE_POLLS_MAX = 120


def events() -> list:
    rng = random.Random(5)
    out: list = []
    for tenant in TENANTS:
        out.append(
            CreditGranted(
                event_id=f"{tenant}-g",
                tenant_id=tenant,
                grant_id=f"{tenant}-g",
                amount=10_000,
                effective_at=0,
                expires_at=None,
                priority=0,
            )
        )
        out += [
            UsageRecorded(
                event_id=f"{tenant}-u{i}",
                tenant_id=tenant,
                amount=rng.randint(1, 50),
                occurred_at=1_000 + i,
                model="tollgate-tiny",
            )
            for i in range(USAGE_PER_TENANT)
        ]
    return out


@pytest.fixture
def settings(kafka_broker, topic_prefix, tmp_path, monkeypatch) -> ProcessorSettings:
    key_path = tmp_path / "signing-key.pem"
    key_path.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    environment = {
        "TOLLGATE_AUDIT_SIGNING_KEY_PATH": str(key_path),
        "TOLLGATE_AUDIT_CHECKPOINT_ENTRIES_MAX": "5",
        "TOLLGATE_KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap,
        "TOLLGATE_TOPIC_PREFIX": topic_prefix,
        "TOLLGATE_TOPIC_PARTITIONS": "2",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return ProcessorSettings(
        spool_path=tmp_path / "spool.sqlite3",
        processor_state_dir=str(tmp_path / "state"),
        processor_app_id=topic_prefix + "processor",
    )


def apart(settings: ProcessorSettings, name: str) -> ProcessorSettings:
    """The settings with a spool of the component's own (one producer per spool file)."""
    return settings.model_copy(update={"spool_path": settings.spool_path.with_name(f"{name}.sqlite3")})


async def entries_end(log: KafkaLog) -> int:
    return sum([await log.end_offset(log.topics.entries, p) for p in range(log.partitions)])


async def fold_and_project(settings: ProcessorSettings, session_factory) -> None:
    await ensure_topics(settings.kafka_bootstrap_servers, ledger_topic_specs(settings))
    async with EventProducer(apart(settings, "producer")) as producer:
        for event in events():
            await producer.publish(event)
    processor = BatchProcessor(settings)
    await processor.start()
    stop = asyncio.Event()
    running = asyncio.create_task(processor.run(stop))
    log = KafkaLog(apart(settings, "reader"))
    await log.start()
    try:
        for _ in range(SETTLE_POLLS_MAX):  # one usage entry per usage event, and one grant entry at most each
            if await entries_end(log) >= len(TENANTS) * USAGE_PER_TENANT:
                break
            await asyncio.sleep(0.25)
    finally:
        stop.set()
        await running
        await processor.stop()
        await log.stop()
    projector = Projector(
        settings=ProjectorSettings(name="audit-e2e", poll_timeout_ms=200),
        topics=LedgerTopics.from_settings(settings),
        bootstrap_servers=settings.kafka_bootstrap_servers,
        session_factory=session_factory,
        dead_letter_log=RecordingDeadLetters(),
    )
    async with projector:
        while await projector.step() or await projector.step():
            pass


async def test_verify_over_kafka_and_postgres_and_the_cli(
    settings, session_factory, database_url, monkeypatch
):
    await fold_and_project(settings, session_factory)
    log = KafkaLog(apart(settings, "verifier"))
    await log.start()
    try:
        report = await verify(log, session_factory, KEY.public_key())
    finally:
        await log.stop()
    assert report.ok, [str(d) for d in report.divergences]
    assert (
        report.tenants == 2 and report.entries >= len(TENANTS) * USAGE_PER_TENANT and report.checkpoints >= 14
    )

    monkeypatch.setenv("DATABASE_URL", database_url)
    runner = CliRunner()
    passed = await asyncio.to_thread(runner.invoke, app, ["audit", "verify"])
    assert passed.exit_code == 0, passed.output
    assert "no divergence" in passed.output

    async with session_factory() as session, session.begin():
        await session.execute(text("SET LOCAL session_replication_role = replica"))
        await session.execute(
            text(
                "UPDATE ledger_entries SET amount = amount + 7"
                " WHERE tenant_id = 'kafka-globex' AND chain_sequence = 4"
            )
        )
    failed = await asyncio.to_thread(runner.invoke, app, ["audit", "verify", "--tenant", "kafka-globex"])
    assert failed.exit_code == 1, failed.output
    assert "tenant kafka-globex, sequence 4, field amount" in failed.output
