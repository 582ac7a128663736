"""The dispatcher over the real local Kafka broker: the same log contract as the embedded log, the same
deliveries; a dispatcher restarted mid-retry resumes from its offsets and rows in Postgres."""

from __future__ import annotations

import pytest

from storage.webhooks import DELIVERED
from streams.log import KafkaLog
from streams.webhooks.dispatcher import WebhookDispatcher
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
