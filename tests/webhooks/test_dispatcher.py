"""The dispatcher over the embedded log and real Postgres, delivering to a real local HTTP receiver that
verifies every request with the `standardwebhooks` package."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from sqlalchemy import select

from storage.projections import stored_offsets
from storage.webhooks import DEAD, DELIVERED, PENDING, WebhookAttempt, WebhookDelivery
from streams.records import DeadLetter
from streams.webhooks import dispatcher as dispatcher_module
from streams.webhooks.dispatcher import WebhookDispatcher
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


async def attempts_of(sessions, endpoint_id: str) -> list[WebhookAttempt]:
    async with sessions() as session:
        rows = await session.execute(
            select(WebhookAttempt)
            .where(WebhookAttempt.endpoint_id == endpoint_id)
            .order_by(WebhookAttempt.attempt_id)
        )
        return list(rows.scalars())


async def test_alerts_are_delivered_signed_and_the_receiver_verifies_them(event_log, sessions, receivers):
    receiver = await receivers()
    await receiver.start()
    tenant = await add_tenant(sessions, "acme")
    await add_endpoint(sessions, tenant, receiver, "we_acme")
    alerts = [alert(tenant, crossing) for crossing in range(1, 6)]
    await produce(event_log, alerts)

    dispatcher = WebhookDispatcher(event_log, sessions, fast_settings())
    expected = {("we_acme", item.alert_id) for item in alerts}
    await run_until(dispatcher, all_in(expected, DELIVERED, sessions))

    assert receiver.unverified == 0
    assert dict(receiver.delivered) == {item.alert_id: 1 for item in alerts}
    bodies = {webhook_id: payload for webhook_id, payload in receiver.requests}
    first = bodies[alerts[0].alert_id]
    assert first["type"] == "balance.below"
    assert first["timestamp"] == "2023-11-14T22:13:20.001Z"
    assert first["data"]["tenant_id"] == tenant and first["data"]["balance"] == 99
    assert first["data"]["threshold"] == 1_000 and first["data"]["crossing"] == 1
    log = await attempts_of(sessions, "we_acme")
    assert [(row.attempt, row.status_code, row.outcome) for row in log] == [(1, 204, DELIVERED)] * 5


async def test_receiver_down_then_failing_then_back_gets_every_alert_once(event_log, sessions, receivers):
    """Connection refused (nothing listens), then 500s, then 204: every alert is delivered once it is back,
    and no id is delivered twice."""
    receiver = await receivers(status=500)
    tenant = await add_tenant(sessions, "acme")
    await add_endpoint(sessions, tenant, receiver, "we_acme")
    alerts = [alert(tenant, crossing) for crossing in range(1, 9)]
    await produce(event_log, alerts)
    dispatcher = WebhookDispatcher(event_log, sessions, fast_settings())

    async def refused_twice() -> bool:
        rows = await attempts_of(sessions, "we_acme")
        return len({row.alert_id for row in rows if row.attempt >= 2}) == len(alerts)

    await run_until(dispatcher, refused_twice)
    refused = await attempts_of(sessions, "we_acme")
    assert all(row.status_code is None and "Connect" in row.error for row in refused)
    assert all(row.outcome == "retrying" and row.next_retry_at_ms is not None for row in refused)

    await receiver.start()  # up, answering 500

    async def failed_with_500() -> bool:
        return (
            len({row.alert_id for row in await attempts_of(sessions, "we_acme") if row.status_code == 500})
            == 8
        )

    await run_until(dispatcher, failed_with_500)
    assert not receiver.delivered and len(receiver.requests) >= len(alerts)
    assert set((await states(sessions)).values()) == {PENDING}

    receiver.status = 204
    expected = {("we_acme", item.alert_id) for item in alerts}
    await run_until(dispatcher, all_in(expected, DELIVERED, sessions))
    await asyncio.sleep(0.3)  # long enough for any stray retry to show
    await dispatcher.consume_step()
    assert await dispatcher.deliver_step() == 0
    assert receiver.unverified == 0
    assert dict(receiver.delivered) == {item.alert_id: 1 for item in alerts}


async def test_an_endpoint_that_never_recovers_is_dead_lettered_after_the_bounded_time(
    event_log, sessions, receivers
):
    receiver = await receivers(status=503)
    await receiver.start()
    tenant = await add_tenant(sessions, "acme")
    await add_endpoint(sessions, tenant, receiver, "we_acme")
    item = alert(tenant, 1)
    await produce(event_log, [item])
    settings = fast_settings(give_up_after_ms=600, first_retry_delay_ms=40, retry_delay_max_ms=80)
    dispatcher = WebhookDispatcher(event_log, sessions, settings)

    await run_until(dispatcher, all_in({("we_acme", item.alert_id)}, DEAD, sessions))

    async with sessions() as session:
        delivery = await session.get(WebhookDelivery, ("we_acme", item.alert_id))
    assert delivery.last_status == 503 and delivery.next_attempt_at_ms is None
    assert delivery.finished_at_ms - delivery.scheduled_at_ms <= settings.give_up_after_ms + 500
    log = await attempts_of(sessions, "we_acme")
    assert len(log) >= 3 and [row.attempt for row in log] == list(range(1, len(log) + 1))
    assert [row.outcome for row in log] == ["retrying"] * (len(log) - 1) + [DEAD]
    assert all(row.next_retry_at_ms <= delivery.scheduled_at_ms + 600 for row in log[:-1])
    assert not receiver.delivered and len(receiver.requests) == len(log)

    letters = [
        msgspec.json.decode(record.value, type=DeadLetter)
        for partition in range(event_log.partitions)
        for record in await event_log.read(event_log.topics.dlq, partition, 0, 100)
    ]
    (letter,) = letters
    assert letter.source_topic == event_log.topics.alerts and letter.key == tenant.encode()
    assert "we_acme" in letter.reason and "HTTP 503" in letter.reason
    assert msgspec.json.decode(letter.value)["data"]["alert_id"] == item.alert_id


async def test_a_dispatcher_killed_mid_retry_resumes_and_a_redelivered_alert_is_not_sent_again(
    event_log, sessions, receivers
):
    receiver = await receivers()
    tenant = await add_tenant(sessions, "acme")
    await add_endpoint(sessions, tenant, receiver, "we_acme")
    alerts = [alert(tenant, crossing) for crossing in range(1, 6)]
    await produce(event_log, alerts[:3])
    first = WebhookDispatcher(event_log, sessions, fast_settings())
    task = asyncio.create_task(first.run(asyncio.Event()))

    async def retrying() -> bool:
        rows = await attempts_of(sessions, "we_acme")
        return len({row.alert_id for row in rows}) == 3

    async with asyncio.timeout(30):
        while not await retrying():
            await asyncio.sleep(0.02)
    task.cancel()  # killed between attempts: no close, nothing flushed
    with pytest.raises(asyncio.CancelledError):
        await task
    assert set((await states(sessions)).values()) == {PENDING}

    await produce(event_log, [*alerts[3:], alerts[0]])  # two new alerts and a redelivered one
    await receiver.start()
    second = WebhookDispatcher(event_log, sessions, fast_settings())
    expected = {("we_acme", item.alert_id) for item in alerts}
    await run_until(second, all_in(expected, DELIVERED, sessions))
    await produce(event_log, [alerts[1]])  # redelivered after it was delivered
    third = WebhookDispatcher(event_log, sessions, fast_settings())
    assert await third.consume_step() == 1
    assert await third.deliver_step() == 0
    await third.close()

    assert len(await states(sessions)) == len(alerts)
    assert dict(receiver.delivered) == {item.alert_id: 1 for item in alerts}


async def test_an_alert_goes_only_to_its_own_tenants_endpoints_of_the_kinds_they_want(
    event_log, sessions, receivers
):
    acme_all, acme_depleted, globex = await receivers(), await receivers(), await receivers()
    for receiver in (acme_all, acme_depleted, globex):
        await receiver.start()
    await add_tenant(sessions, "acme")
    await add_tenant(sessions, "globex")
    await add_endpoint(sessions, "acme", acme_all, "we_acme_all")
    await add_endpoint(sessions, "acme", acme_depleted, "we_acme_depleted", kinds=["depleted"])
    await add_endpoint(sessions, "globex", globex, "we_globex")
    acme_alerts = [alert("acme", 1), alert("acme", 1, rule_id="zero", kind="depleted")]
    globex_alerts = [alert("globex", 1), alert("globex", 2)]
    await produce(event_log, [*acme_alerts, *globex_alerts])
    dispatcher = WebhookDispatcher(event_log, sessions, fast_settings())
    expected = {
        *(("we_acme_all", item.alert_id) for item in acme_alerts),
        ("we_acme_depleted", acme_alerts[1].alert_id),
        *(("we_globex", item.alert_id) for item in globex_alerts),
    }
    await run_until(dispatcher, all_in(expected, DELIVERED, sessions))

    assert set(await states(sessions)) == expected
    assert set(acme_all.delivered) == {item.alert_id for item in acme_alerts}
    assert set(acme_depleted.delivered) == {acme_alerts[1].alert_id}
    assert set(globex.delivered) == {item.alert_id for item in globex_alerts}
    assert acme_all.unverified == acme_depleted.unverified == globex.unverified == 0


async def test_a_slow_endpoint_does_not_hold_back_the_others(event_log, sessions, receivers):
    slow, quick = await receivers(delay_s=1.5), await receivers()
    await slow.start()
    await quick.start()
    await add_tenant(sessions, "slowco")
    await add_tenant(sessions, "quickco")
    await add_endpoint(sessions, "slowco", slow, "we_slow")
    await add_endpoint(sessions, "quickco", quick, "we_quick")
    await produce(event_log, [alert("slowco", crossing) for crossing in range(1, 21)])
    quick_alerts = [alert("quickco", crossing) for crossing in range(1, 21)]
    await produce(event_log, quick_alerts)
    settings = fast_settings(in_flight_deliveries_max=6, endpoint_in_flight_max=2)
    dispatcher = WebhookDispatcher(event_log, sessions, settings)

    await run_until(
        dispatcher, all_in({("we_quick", item.alert_id) for item in quick_alerts}, DELIVERED, sessions), 10
    )

    # the 20 quick ones are through while the slow endpoint has had at most a few requests answered
    assert len(slow.delivered) <= settings.endpoint_in_flight_max
    assert slow.in_flight_peak <= settings.endpoint_in_flight_max


class CrashBeforeCommit(RuntimeError):
    pass


async def test_offsets_advance_only_in_the_transaction_that_schedules_the_deliveries(
    event_log, sessions, receivers, monkeypatch
):
    """A crash after the delivery rows are written and before the commit leaves neither rows nor offsets:
    the next step reads the same alerts and schedules them."""
    receiver = await receivers()
    tenant = await add_tenant(sessions, "acme")
    await add_endpoint(sessions, tenant, receiver, "we_acme")
    alerts = [alert(tenant, crossing) for crossing in range(1, 4)]
    await produce(event_log, alerts)
    dispatcher = WebhookDispatcher(event_log, sessions, fast_settings())
    real_schedule = dispatcher_module.schedule

    async def schedule_then_crash(session, *arguments) -> None:
        await real_schedule(session, *arguments)
        raise CrashBeforeCommit

    monkeypatch.setattr(dispatcher_module, "schedule", schedule_then_crash)
    with pytest.raises(CrashBeforeCommit):
        await dispatcher.consume_step()
    async with sessions() as session:
        assert await stored_offsets(session, dispatcher.settings.consumer_name) == {}
    assert await states(sessions) == {}

    monkeypatch.setattr(dispatcher_module, "schedule", real_schedule)
    assert await dispatcher.consume_step() == len(alerts)
    assert await dispatcher.consume_step() == 0
    assert set(await states(sessions)) == {("we_acme", item.alert_id) for item in alerts}
    async with sessions() as session:
        offsets = await stored_offsets(session, dispatcher.settings.consumer_name)
    assert sum(offsets.values()) == len(alerts)
    await dispatcher.close()


async def test_a_request_is_bounded_by_the_timeout_from_connect_to_answer(event_log, sessions, receivers):
    receiver = await receivers(delay_s=2.0)
    await receiver.start()
    tenant = await add_tenant(sessions, "acme")
    await add_endpoint(sessions, tenant, receiver, "we_acme")
    item = alert(tenant, 1)
    await produce(event_log, [item])
    settings = fast_settings(request_timeout_ms=300, give_up_after_ms=200)
    dispatcher = WebhookDispatcher(event_log, sessions, settings)

    await run_until(dispatcher, all_in({("we_acme", item.alert_id)}, DEAD, sessions))

    (attempt,) = await attempts_of(sessions, "we_acme")
    assert attempt.error == "timed out after 300 ms" and attempt.status_code is None
    assert 300 <= attempt.latency_ms < 1_500


async def test_due_deliveries_held_back_by_the_in_flight_limit_do_not_spin_the_loop(
    event_log, sessions, receivers, monkeypatch
):
    """Three alerts due for one endpoint that takes one request at a time, each answered in 1 s: while it
    is busy the others stay due and unclaimable, and the idle loop waits for the request to finish (or
    `poll_interval_ms`) instead of asking again at once."""
    import streams.webhooks.dispatcher as dispatcher_module

    slow = await receivers(delay_s=1.0)
    await slow.start()
    await add_tenant(sessions, "slowco")
    await add_endpoint(sessions, "slowco", slow, "we_slow")
    items = [alert("slowco", crossing) for crossing in range(1, 4)]
    await produce(event_log, items)
    looks = []
    next_due_ms = dispatcher_module.next_due_ms

    async def counted(session):
        looks.append(1)
        return await next_due_ms(session)

    monkeypatch.setattr(dispatcher_module, "next_due_ms", counted)
    settings = fast_settings(endpoint_in_flight_max=1, poll_interval_ms=200)
    dispatcher = WebhookDispatcher(event_log, sessions, settings)
    await run_until(
        dispatcher, all_in({("we_slow", item.alert_id) for item in items}, DELIVERED, sessions), 15
    )
    assert len(slow.delivered) == 3
    # about 3 s of waiting: at most one look per 200 ms poll plus one per finished request (a spin: thousands)
    assert len(looks) <= 3 * 1_000 // 200 + 10, len(looks)
