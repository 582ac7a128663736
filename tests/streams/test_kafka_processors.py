"""Both Kafka processor engines on a real broker (the batch engine, the default, and the faust agent):
out-of-order and duplicated events, kill -9 mid-stream and a restart, a malformed record, and the audit
replay's verify at the end."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time

import msgspec
import pytest

from ledger.events import CreditGranted, GrantVoided, UsageRecorded
from ledger.tenant import Book
from streams.producer import EventProducer
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

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

# engine -> (module run as the processor, the log line it prints once it consumes)
ENGINES = {
    "batch": ("streams.batch_processor", "Processor ready"),
    "faust": ("streams.faust_app", "Worker ready"),
}

TENANTS = ["acme", "globex", "initech"]
WORKER_READY_TIMEOUT_S = 90
CONVERGE_TIMEOUT_S = 90


def ledger_events(now: int, usage_per_tenant: int) -> list:
    rng = random.Random(11)
    events = []
    for tenant in TENANTS:
        for n in range(5):
            events.append(
                CreditGranted(
                    event_id=f"{tenant}-grant-{n}",
                    tenant_id=tenant,
                    grant_id=f"{tenant}-g{n}",
                    amount=rng.randint(2_000, 6_000),
                    effective_at=now - 60_000 + n * 5_000,
                    expires_at=None if n % 2 else now + 3_600_000,
                    priority=n % 2,
                )
            )
        events.append(
            GrantVoided(
                event_id=f"{tenant}-void", tenant_id=tenant, grant_id=f"{tenant}-g1", voided_at=now - 10_000
            )
        )
        for n in range(usage_per_tenant):
            events.append(
                UsageRecorded(
                    event_id=f"{tenant}-req-{n}",
                    tenant_id=tenant,
                    amount=rng.randint(1, 60),
                    occurred_at=now - 50_000 + rng.randint(0, 49_000),
                    model="tiny",
                    prompt_tokens=4,
                    completion_tokens=6,
                )
            )
    return events


def expected_balance(events, tenant: str, at: int) -> tuple[int, int]:
    book = Book()
    for event in {e.event_id: e for e in events}.values():
        book.apply(event)
    ledger = book.tenant(tenant)
    return ledger.balance_at(at), ledger.account.overage_total


async def converged(settings, events) -> bool:
    live = await live_balances(settings)
    if set(live) != set(TENANTS):
        return False
    return all((r.balance, r.overage) == expected_balance(events, t, r.as_of) for t, r in live.items())


async def wait_converged(settings, events, worker: ComponentProcess) -> None:
    deadline = time.monotonic() + CONVERGE_TIMEOUT_S
    while time.monotonic() < deadline:
        if await converged(settings, events):
            return
        assert worker.alive(), worker.log_tail()
        await asyncio.sleep(1)
    live = await live_balances(settings)
    differences = {
        tenant: (
            (record.balance, record.overage, record.applied_offset),
            expected_balance(events, tenant, record.as_of),
        )
        for tenant, record in live.items()
    }
    raise AssertionError(f"balances did not converge: (live, applied offset) vs expected {differences}")


def processor_env(settings, tmp_path) -> dict[str, str]:
    return {
        "TOLLGATE_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "TOLLGATE_TOPIC_PREFIX": settings.topic_prefix,
        "TOLLGATE_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "TOLLGATE_PROCESSOR_APP_ID": settings.topic_prefix + "ledger",
        "TOLLGATE_PROCESSOR_DATA_DIR": str(tmp_path / "faust"),
        "TOLLGATE_SPOOL_PATH": str(tmp_path / "processor-spool.sqlite3"),
        "TOLLGATE_PROCESSOR_BATCH_MAX": "50",
    }


@pytest.mark.parametrize("engine", sorted(ENGINES))
async def test_kill_restart_duplicates_and_a_malformed_record(engine, kafka_broker, topic_prefix, tmp_path):
    module, ready_line = ENGINES[engine]
    settings = stream_settings(kafka_broker.bootstrap, topic_prefix, tmp_path)
    topics = LedgerTopics.from_settings(settings)
    await create_ledger_topics(settings)
    now = int(time.time() * 1000)
    events = ledger_events(now, usage_per_tenant=400)
    rng = random.Random(3)
    stream = events + rng.sample(events, 150)  # producer-level duplicates
    rng.shuffle(stream)
    stream = after_first_grants(events, stream)
    first, second = stream[:300], stream[300:]

    worker = ComponentProcess(module, processor_env(settings, tmp_path), tmp_path / "processor.log").start()
    try:
        worker.wait_for_log(ready_line, WORKER_READY_TIMEOUT_S)
        async with EventProducer(settings) as producer:
            await producer.publish_many(first)
            await producer.send(topics.events, b"acme", b"{not json")  # lands in the DLQ; the rest goes on
            await producer.publish_many(second[:600])
            await asyncio.sleep(0.5)  # the processor is mid-stream
            worker.kill()
            await producer.publish_many(second[600:])
        worker.start()
        worker.wait_for_log(ready_line, WORKER_READY_TIMEOUT_S)
        await wait_converged(settings, events, worker)
    finally:
        worker.stop()

    await assert_entries_complete_and_consistent(settings, events)

    dead = await read_topic(settings.kafka_bootstrap_servers, topics.dlq, 3, expected_count=1, quiet_s=1)
    letters = [msgspec.json.decode(r.value) for r in dead]
    assert any("undecodable" in letter["reason"] and letter["offset"] >= 0 for letter in letters)

    result = await replay(settings)
    assert result.dead_letters >= 1
    assert compare(result, await live_balances(settings)) == []

    env = {**os.environ, **processor_env(settings, tmp_path)}
    verified = subprocess.run(
        [sys.executable, "-m", "tollgate", "ledger", "replay", "--verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "verified" in verified.stdout and "acme" in verified.stdout

    live = await live_balances(settings)
    forged = msgspec.structs.replace(live["acme"], balance=live["acme"].balance + 1)
    async with EventProducer(
        settings.model_copy(update={"spool_path": tmp_path / "forger.sqlite3"})
    ) as producer:
        await producer.send(topics.balances, b"acme", msgspec.json.encode(forged))
    caught = subprocess.run(
        [sys.executable, "-m", "tollgate", "ledger", "replay", "--verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert caught.returncode == 1 and "MISMATCH" in caught.stdout and "acme" in caught.stdout
