"""Secret rotation with an overlap, end to end: the admin API rotates an endpoint's secret, the dispatcher
delivers over the embedded log and real Postgres, and a real local receiver checks every request with the
`standardwebhooks` package under the old secret and under the new one. During the overlap a receiver
holding either verifies; after it (the clock the dispatcher and the admin API share is moved on) only the
new one does; overlap 0 stops the old secret at once; a second rotation drops the oldest secret."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from gateway.admin import AdminSettings
from storage.webhooks import DELIVERED, WebhookEndpoint
from streams.webhooks.dispatcher import WebhookDispatcher
from tests.admin.conftest import ADMIN_TOKEN, RecordingPublisher
from tests.fixtures.admin_api import admin_api, admin_client
from tests.webhooks.conftest import add_tenant, alert, all_in, fast_settings, produce, run_until

pytestmark = pytest.mark.postgres

OVERLAP_MS = 60_000  # short enough that moving past it keeps timestamps within the verifier's 5 minutes


@dataclass
class ShiftedClock:
    """The wall clock moved on by `offset_ms`: the receiver's verifier checks timestamps against the real
    time, so the test moves this clock only within its 5-minute tolerance."""

    offset_ms: int = 0

    def __call__(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms


@pytest.fixture
def clock() -> ShiftedClock:
    return ShiftedClock()


@pytest.fixture
async def admin(sessions, clock):
    publisher = RecordingPublisher()  # no route here publishes
    async with admin_client(admin_api(sessions, publisher, ADMIN_TOKEN, clock=clock), ADMIN_TOKEN) as client:
        yield client


async def endpoint_for(admin, sessions, receiver, tenant_id: str) -> tuple[str, str]:
    """(endpoint id, its first secret) of an endpoint registered through the admin API; the receiver
    holds that secret."""
    response = await admin.post(f"/admin/v1/tenants/{tenant_id}/webhooks", json={"url": receiver.url})
    assert response.status_code == 201, response.text
    created = response.json()
    receiver.secret = created["secret"]
    return created["endpoint_id"], created["secret"]


async def rotate(admin, endpoint_id: str, **body) -> dict:
    response = await admin.post(f"/admin/v1/webhooks/{endpoint_id}/rotate-secret", json=body or None)
    assert response.status_code == 200, response.text
    return response.json()


async def deliver(event_log, sessions, clock, endpoint_id: str, alerts) -> None:
    await produce(event_log, alerts)
    dispatcher = WebhookDispatcher(event_log, sessions, fast_settings(), clock_ms=clock)
    await run_until(
        dispatcher, all_in({(endpoint_id, item.alert_id) for item in alerts}, DELIVERED, sessions)
    )


async def test_during_the_overlap_old_and_new_secrets_verify_and_after_it_only_the_new(
    event_log, sessions, receivers, admin, clock
):
    receiver = await receivers()
    await receiver.start()
    tenant = await add_tenant(sessions, "acme")
    endpoint, old = await endpoint_for(admin, sessions, receiver, tenant)

    rotated = await rotate(admin, endpoint, overlap_ms=OVERLAP_MS)
    new = rotated["secret"]
    receiver.also_held = [new]  # `secret` stays the old one: this receiver has not deployed the new one
    assert new != old and rotated["old_secret_stops_at"] == rotated["secret_rotated_at"] + OVERLAP_MS
    assert rotated["previous_secret_expires_at"] == rotated["old_secret_stops_at"]

    during = [alert(tenant, crossing) for crossing in range(1, 4)]
    await deliver(event_log, sessions, clock, endpoint, during)
    assert receiver.unverified == 0 and dict(receiver.delivered) == {item.alert_id: 1 for item in during}
    assert receiver.verified_with == {old: 3, new: 3}
    assert all(len(header.split(" ")) == 2 for header in receiver.signatures)

    clock.offset_ms = rotated["old_secret_stops_at"] - clock() + 1_000  # the overlap is over
    receiver.secret, receiver.also_held = new, [old]  # now deployed; `old` is a receiver that never did
    after = [alert(tenant, crossing) for crossing in range(4, 6)]
    await deliver(event_log, sessions, clock, endpoint, after)
    assert receiver.unverified == 0 and set(receiver.delivered) == {item.alert_id for item in during + after}
    assert receiver.verified_with == {old: 3, new: 5}
    assert len(receiver.signatures[-1].split(" ")) == 1


async def test_overlap_zero_stops_the_old_secret_at_once(event_log, sessions, receivers, admin, clock):
    receiver = await receivers()
    await receiver.start()
    tenant = await add_tenant(sessions, "acme")
    endpoint, old = await endpoint_for(admin, sessions, receiver, tenant)

    rotated = await rotate(admin, endpoint, overlap_ms=0)
    new = rotated["secret"]
    assert rotated["previous_secret_expires_at"] is None
    assert rotated["old_secret_stops_at"] == rotated["secret_rotated_at"]
    receiver.secret, receiver.also_held = new, [old]

    alerts = [alert(tenant, crossing) for crossing in range(1, 3)]
    await deliver(event_log, sessions, clock, endpoint, alerts)
    assert receiver.unverified == 0 and receiver.verified_with == {new: 2}
    assert all(len(header.split(" ")) == 1 for header in receiver.signatures)


async def test_rotating_during_an_overlap_keeps_only_the_latest_previous_secret(
    event_log, sessions, receivers, admin, clock
):
    receiver = await receivers()
    await receiver.start()
    tenant = await add_tenant(sessions, "acme")
    endpoint, first = await endpoint_for(admin, sessions, receiver, tenant)

    second = (await rotate(admin, endpoint, overlap_ms=OVERLAP_MS))["secret"]
    third = (await rotate(admin, endpoint, overlap_ms=OVERLAP_MS))["secret"]
    async with sessions() as session:
        row = await session.get(WebhookEndpoint, endpoint)
    assert (row.secret, row.previous_secret) == (third, second)
    receiver.secret, receiver.also_held = third, [second, first]

    alerts = [alert(tenant, crossing) for crossing in range(1, 3)]
    await deliver(event_log, sessions, clock, endpoint, alerts)
    assert receiver.unverified == 0 and receiver.verified_with == {third: 2, second: 2}
    assert all(len(header.split(" ")) == 2 for header in receiver.signatures)


async def test_the_default_overlap_is_the_setting(event_log, sessions, receivers, admin, clock):
    receiver = await receivers()
    tenant = await add_tenant(sessions, "acme")
    endpoint, _ = await endpoint_for(admin, sessions, receiver, tenant)
    rotated = await rotate(admin, endpoint)
    default = AdminSettings().webhook_secret_overlap_ms
    assert rotated["previous_secret_expires_at"] == rotated["secret_rotated_at"] + default
