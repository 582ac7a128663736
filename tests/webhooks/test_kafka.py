"""The dispatcher over the real local Kafka broker: the same log contract as the embedded log, the same
deliveries; a dispatcher restarted mid-retry resumes from its offsets and rows in Postgres."""

from __future__ import annotations

import asyncio

import pytest

from storage.webhooks import DELIVERED
from streams.log import KafkaLog
from streams.webhooks.dispatcher import WebhookDispatcher
from tests.fixtures.processes import ComponentProcess
from tests.streams.helpers import create_ledger_topics, stream_settings
from tests.webhooks.conftest import (
    add_endpoint,
    add_tenant,
    alert,
    all_in,
    fast_settings,
    produce,
    run_until,
    states,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


@pytest.fixture
async def kafka_log(kafka_broker, topic_prefix, tmp_path):
    settings = stream_settings(kafka_broker.bootstrap, topic_prefix, tmp_path)
    await create_ledger_topics(settings)
    log = KafkaLog(settings)
    await log.start()
    yield log
    await log.stop()


async def test_alerts_on_kafka_are_delivered_once_across_downtime_and_a_restart(
    kafka_log, sessions, receivers
):
    receiver = await receivers()
    acme, globex = await add_tenant(sessions, "acme"), await add_tenant(sessions, "globex")
    await add_endpoint(sessions, acme, receiver, "we_acme")
    other = await receivers()
    await other.start()
    await add_endpoint(sessions, globex, other, "we_globex")
    alerts = [alert(acme, crossing) for crossing in range(1, 11)]
    await produce(kafka_log, alerts[:6])
    settings = fast_settings(consumer_name=f"{kafka_log.topics.alerts}-dispatcher")

    first = WebhookDispatcher(kafka_log, sessions, settings)

    async def all_tried() -> bool:
        return len(await states(sessions)) == 6 and first.attempts_made >= 6

    await run_until(first, all_tried)  # the receiver is down: every attempt failed, each waits to retry
    assert not receiver.delivered

    await produce(kafka_log, [*alerts[6:], alerts[2]])  # new ones and a redelivered one
    await receiver.start()
    second = WebhookDispatcher(kafka_log, sessions, settings)
    await run_until(second, all_in({("we_acme", item.alert_id) for item in alerts}, DELIVERED, sessions))

    assert dict(receiver.delivered) == {item.alert_id: 1 for item in alerts}
    assert receiver.unverified == 0 and not other.requests  # globex's endpoint never saw acme's alerts
    assert set(await states(sessions)) == {("we_acme", item.alert_id) for item in alerts}


async def test_the_dispatcher_process_over_kafka_survives_kill_9_mid_retry(
    kafka_log, kafka_broker, sessions, receivers, database_url, topic_prefix, tmp_path
):
    """`python -m streams.webhooks`, the deployment's process, as docker-compose runs it: killed -9 while
    its retries wait, started again, it delivers every alert once."""
    receiver = await receivers(status=500)
    await receiver.start()
    tenant = await add_tenant(sessions, "acme")
    await add_endpoint(sessions, tenant, receiver, "we_acme")
    alerts = [alert(tenant, crossing) for crossing in range(1, 6)]
    await produce(kafka_log, alerts)
    env = {
        "TOLLGATE_KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap,
        "TOLLGATE_TOPIC_PREFIX": topic_prefix,
        "TOLLGATE_TOPIC_PARTITIONS": str(kafka_log.partitions),
        "DATABASE_URL": database_url,
        "TOLLGATE_SPOOL_PATH": str(tmp_path / "dispatcher-spool.sqlite3"),
        "TOLLGATE_WEBHOOK_CONSUMER_NAME": f"{topic_prefix}webhooks",
        "TOLLGATE_WEBHOOK_FIRST_RETRY_DELAY_MS": "100",
        "TOLLGATE_WEBHOOK_RETRY_DELAY_MAX_MS": "300",
        "TOLLGATE_WEBHOOK_POLL_INTERVAL_MS": "50",
    }
    process = ComponentProcess("streams.webhooks", env, tmp_path / "dispatcher.log")

    async def all_failed_once() -> bool:
        return len(receiver.requests) >= len(alerts) and len(await states(sessions)) == len(alerts)

    process.start()
    try:
        async with asyncio.timeout(60):
            while not await all_failed_once():
                assert process.alive(), process.log_tail()
                await asyncio.sleep(0.05)
    finally:
        process.kill()
    assert not receiver.delivered

    receiver.status = 204
    process.start()
    try:
        expected = {("we_acme", item.alert_id) for item in alerts}
        async with asyncio.timeout(60):
            while not await all_in(expected, DELIVERED, sessions)():
                assert process.alive(), process.log_tail()
                await asyncio.sleep(0.05)
    finally:
        process.stop()
    assert dict(receiver.delivered) == {item.alert_id: 1 for item in alerts}
    assert receiver.unverified == 0
