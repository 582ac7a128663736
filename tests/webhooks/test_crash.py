"""kill -9 of a dispatcher process: between attempts (pending retries resume from Postgres) and with a request
in flight (its lease runs out, then it is claimed again); every alert is delivered once the receiver is
back, none twice by id. Also: disabling an endpoint dead-letters what was still pending for it."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import select

from storage.webhooks import DEAD, DELIVERED, PENDING, WebhookAttempt, WebhookEndpoint
from streams.webhooks.dispatcher import WebhookDispatcher
from tests.fixtures.processes import ComponentProcess
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

pytestmark = pytest.mark.postgres

REQUEST_TIMEOUT_MS = 1_500


def dispatcher_process(database_url: str, topic_prefix: str, tmp_path) -> ComponentProcess:
    env = {
        "TOLLGATE_WEBHOOK_FIRST_RETRY_DELAY_MS": "100",
        "TOLLGATE_WEBHOOK_RETRY_DELAY_MAX_MS": "300",
        "TOLLGATE_WEBHOOK_REQUEST_TIMEOUT_MS": str(REQUEST_TIMEOUT_MS),
        "TOLLGATE_WEBHOOK_POLL_INTERVAL_MS": "20",
    }
    return ComponentProcess(
        "tests.webhooks.dispatcher_process",
        env,
        tmp_path / "dispatcher.log",
        [database_url, topic_prefix, str(tmp_path)],
    )


async def wait_for(check, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.05)


async def attempted(sessions) -> set[str]:
    async with sessions() as session:
        return set((await session.execute(select(WebhookAttempt.alert_id))).scalars())


async def test_kill_9_between_attempts_resumes_the_pending_retries(
    event_log, sessions, receivers, database_url, topic_prefix, tmp_path
):
    receiver = await receivers(status=500)
    await receiver.start()
    tenant = await add_tenant(sessions, "acme")
    await add_endpoint(sessions, tenant, receiver, "we_acme")
    alerts = [alert(tenant, crossing) for crossing in range(1, 7)]
    await produce(event_log, alerts)
    process = dispatcher_process(database_url, topic_prefix, tmp_path).start()
    try:
        await wait_for(lambda: _all_attempted(sessions, alerts))
    finally:
        process.kill()
    assert set((await states(sessions)).values()) == {PENDING}
    assert not receiver.delivered

    receiver.status = 204
    restarted = WebhookDispatcher(event_log, sessions, fast_settings())
    await run_until(restarted, all_in({("we_acme", item.alert_id) for item in alerts}, DELIVERED, sessions))
    assert dict(receiver.delivered) == {item.alert_id: 1 for item in alerts}
    assert receiver.unverified == 0


async def _all_attempted(sessions, alerts) -> bool:
    return await attempted(sessions) >= {item.alert_id for item in alerts}


async def test_kill_9_with_requests_in_flight_claims_them_again_after_the_lease(
    event_log, sessions, receivers, database_url, topic_prefix, tmp_path
):
    receiver = await receivers(status=500, delay_s=1.0)  # the killed process's requests are answered 500
    await receiver.start()
    tenant = await add_tenant(sessions, "acme")
    await add_endpoint(sessions, tenant, receiver, "we_acme")
    alerts = [alert(tenant, crossing) for crossing in range(1, 4)]
    await produce(event_log, alerts)
    process = dispatcher_process(database_url, topic_prefix, tmp_path).start()

    async def in_flight() -> bool:
        return receiver.in_flight == len(alerts)

    try:
        await wait_for(in_flight)
    finally:
        process.kill()
    assert not await attempted(sessions), "killed before any attempt was recorded"

    await asyncio.sleep(1.2)
    receiver.status, receiver.delay_s = 204, 0.0
    restarted = WebhookDispatcher(event_log, sessions, fast_settings(request_timeout_ms=REQUEST_TIMEOUT_MS))
    assert await restarted.deliver_step() == 0, "still leased to the killed process"
    await run_until(restarted, all_in({("we_acme", item.alert_id) for item in alerts}, DELIVERED, sessions))
    assert dict(receiver.delivered) == {item.alert_id: 1 for item in alerts}


async def test_disabling_an_endpoint_dead_letters_its_pending_deliveries(event_log, sessions, receivers):
    receiver = await receivers(status=500)
    await receiver.start()
    tenant = await add_tenant(sessions, "acme")
    await add_endpoint(sessions, tenant, receiver, "we_acme")
    item = alert(tenant, 1)
    await produce(event_log, [item])
    dispatcher = WebhookDispatcher(event_log, sessions, fast_settings())

    async def tried() -> bool:
        return item.alert_id in await attempted(sessions)

    await run_until(dispatcher, tried)
    async with sessions() as session, session.begin():
        (await session.get(WebhookEndpoint, "we_acme")).enabled = False
    requests_before = len(receiver.requests)
    await run_until(dispatcher, all_in({("we_acme", item.alert_id)}, DEAD, sessions))
    assert len(receiver.requests) <= requests_before + 1  # at most one already claimed before the change
    await produce(event_log, [alert(tenant, 2)])
    assert await dispatcher.consume_step() == 1
    assert len(await states(sessions)) == 1, "nothing is scheduled for a disabled endpoint"
    await dispatcher.close()


async def test_the_delivery_log_forgets_old_attempts_but_not_what_was_delivered(
    event_log, sessions, receivers
):
    receiver = await receivers()
    await receiver.start()
    tenant = await add_tenant(sessions, "acme")
    await add_endpoint(sessions, tenant, receiver, "we_acme")
    item = alert(tenant, 1)
    await produce(event_log, [item])
    dispatcher = WebhookDispatcher(event_log, sessions, fast_settings(delivery_log_retention_ms=60_000))
    await run_until(dispatcher, all_in({("we_acme", item.alert_id)}, DELIVERED, sessions))
    assert await attempted(sessions) == {item.alert_id}

    later = WebhookDispatcher(
        event_log,
        sessions,
        fast_settings(delivery_log_retention_ms=60_000),
        clock_ms=lambda: int(time.time() * 1000) + 61_000,
    )
    assert await later.prune_when_due() == 1
    assert await later.prune_when_due() == 0, "once per interval"
    assert not await attempted(sessions)
    await produce(event_log, [item])  # redelivered after its attempts were forgotten
    assert await later.consume_step() == 1 and await later.deliver_step() == 0
    await later.close()
    assert dict(receiver.delivered) == {item.alert_id: 1}


async def test_the_prune_erases_previous_secrets_whose_overlap_ended(event_log, sessions, receivers):
    receiver = await receivers()
    tenant = await add_tenant(sessions, "acme")
    await add_endpoint(sessions, tenant, receiver, "we_ended")
    await add_endpoint(sessions, tenant, receiver, "we_overlapping")
    now = int(time.time() * 1000)
    async with sessions() as session, session.begin():
        (await session.get(WebhookEndpoint, "we_ended")).rotate_secret("whsec_" + "A" * 44, now, 60_000)
        (await session.get(WebhookEndpoint, "we_overlapping")).rotate_secret(
            "whsec_" + "B" * 44, now, 600_000
        )
    dispatcher = WebhookDispatcher(event_log, sessions, fast_settings(), clock_ms=lambda: now + 61_000)
    await dispatcher.prune_when_due()
    await dispatcher.close()
    async with sessions() as session:
        ended = await session.get(WebhookEndpoint, "we_ended")
        overlapping = await session.get(WebhookEndpoint, "we_overlapping")
        assert (ended.previous_secret, ended.previous_secret_expires_at_ms) == (None, None)
        assert ended.secret == "whsec_" + "A" * 44
        assert overlapping.previous_secret is not None
        assert overlapping.previous_secret_expires_at_ms == now + 600_000
