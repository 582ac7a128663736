"""Alerts and the auto top-up end to end over the real local Kafka broker and Postgres: the batch engine
(`python -m streams.batch_processor`) folds a tenant's rules and usage and publishes one alert per
crossing on ledger.alerts; the top-up agent grants once; a processor that re-folds the whole log from
scratch (a replay) publishes the same alert ids with the same bytes and no new one, and the agent grants
nothing more."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.admin.settings import AdminSettings
from ledger.alerts import decode_alert
from ledger.entries import decode_entry
from ledger.events import AlertRuleSet
from streams.log import KafkaLog
from tests.alerts.conftest import add_tenant, first_grant, grant_rows, top_up_rule, usage
from tests.fixtures.processes import ComponentProcess
from tests.streams.helpers import create_ledger_topics, stream_settings
from tollgate.topup_agent import TopUpAgent

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

READY_TIMEOUT_S = 90
WAIT_S = 60
TENANT = "acme"


def processor_env(settings, tmp_path, name: str) -> dict[str, str]:
    return {
        "TOLLGATE_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "TOLLGATE_TOPIC_PREFIX": settings.topic_prefix,
        "TOLLGATE_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "TOLLGATE_PROCESSOR_APP_ID": settings.topic_prefix + name,  # its own state: a fresh fold
        "TOLLGATE_PROCESSOR_DATA_DIR": str(tmp_path / name),
        "TOLLGATE_SPOOL_PATH": str(tmp_path / f"{name}-spool.sqlite3"),
    }


async def read_all(kafka_log: KafkaLog, topic: str) -> list:
    records = []
    for partition in range(kafka_log.partitions):
        records += await kafka_log.read(topic, partition, 0, 10_000)
    return records


async def wait_for(condition, process: ComponentProcess) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await condition():
        assert process.alive(), process.log_tail()
        assert time.monotonic() < deadline, f"timed out; processor log:\n{process.log_tail()}"
        await asyncio.sleep(0.2)


async def start_processor(settings, tmp_path, name: str) -> ComponentProcess:
    process = ComponentProcess(
        "streams.batch_processor", processor_env(settings, tmp_path, name), tmp_path / f"{name}.log"
    )
    process.start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while "Processor ready" not in process.log_tail(200):
        assert process.alive(), process.log_tail()
        assert time.monotonic() < deadline, process.log_tail()
        await asyncio.sleep(0.2)
    return process


async def test_one_alert_per_crossing_a_replay_derives_no_new_id_and_the_top_up_is_granted_once(
    kafka_broker, topic_prefix, tmp_path, session_factory
):
    settings = stream_settings(kafka_broker.bootstrap, topic_prefix, tmp_path)
    await create_ledger_topics(settings)
    await add_tenant(session_factory, TENANT)
    kafka_log = KafkaLog(settings)
    await kafka_log.start()
    low = AlertRuleSet(
        event_id="acme-low", tenant_id=TENANT, rule_id="low", kind="balance_below", threshold=400, set_at=0
    )
    for event in (first_grant(TENANT), low, top_up_rule(TENANT, monthly_count_max=1)):
        await kafka_log.publish(event)
    for n in range(4):  # 1,000 - 4 x 200: below 400 at the third, below the top-up's 300 at the fourth
        await kafka_log.publish(usage(TENANT, n, 200, 1_000 + n))
    topic = kafka_log.topics.alerts
    processor = await start_processor(settings, tmp_path, "ledger")
    try:

        async def alerts_are(count: int):
            async def check() -> bool:
                return len(await read_all(kafka_log, topic)) >= count

            return check

        await wait_for(await alerts_are(2), processor)
        first = {decode_alert(r.value).alert_id: r.value for r in await read_all(kafka_log, topic)}
        kinds = sorted((decode_alert(v).rule_id, decode_alert(v).kind) for v in first.values())
        assert kinds == [("auto", "top_up"), ("low", "balance_below")]
        assert all(r.key == TENANT.encode() for r in await read_all(kafka_log, topic))

        agent = TopUpAgent(kafka_log, session_factory, AdminSettings())
        while agent.granted == 0:
            await agent.step()
        await wait_for(await alerts_are(3), processor)  # the top-up lifts the balance: `low` recovers
        recovered = [decode_alert(r.value) for r in await read_all(kafka_log, topic)]
        assert [(a.rule_id, a.kind, a.balance) for a in recovered][2:] == [("low", "recovered", 700)]
    finally:
        processor.stop()

    before = {decode_alert(r.value).alert_id: r.value for r in await read_all(kafka_log, topic)}
    replay = await start_processor(settings, tmp_path, "replay")  # the whole log folded again from scratch
    try:
        await wait_for(await alerts_are(2 * len(before)), replay)
        await asyncio.sleep(1.0)  # time for an alert more, were there one
    finally:
        replay.stop()
    records = await read_all(kafka_log, topic)
    assert len(records) == 2 * len(before), "every alert once more, none new"
    assert all(before[decode_alert(r.value).alert_id] == r.value for r in records), "same id, same bytes"

    await agent.step()
    assert agent.granted == 1, "the replayed top-up alert grants nothing more"
    [grant] = [g for g in await grant_rows(session_factory, TENANT)]
    entries = [decode_entry(r.value) for r in await read_all(kafka_log, kafka_log.topics.entries)]
    recorded = {
        (e.entry_id, e.reference) for e in entries if getattr(e, "grant_id", None) == grant.grant_id
        and type(e).__name__ == "GrantRecorded"
    }  # fmt: skip
    assert len(recorded) == 1 and {reference for _, reference in recorded} == {"top-up rule auto, crossing 1"}
    await kafka_log.stop()
