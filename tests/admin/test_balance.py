"""GET balance?at=T: folded from the archived events, exact at any T, whatever order they arrived in."""

import random

import pytest

from gateway.admin import AdminSettings
from ledger.events import CreditGranted, GrantVoided, UsageRecorded, event_order_key
from ledger.tenant import TenantLedger
from tests.admin.conftest import ADMIN_TOKEN, archive_events
from tests.fixtures.admin_api import admin_api, admin_client

pytestmark = pytest.mark.postgres


async def balance(client, tenant_id, at):
    response = await client.get(f"/admin/v1/tenants/{tenant_id}/balance", params={"at": at})
    assert response.status_code == 200, response.text
    return response.json()


async def test_balance_through_grants_usage_and_expiry(client, tenant_id, publisher, session_factory):
    await client.post(
        f"/admin/v1/tenants/{tenant_id}/grants",
        json={"amount": 100, "effective_at": 1_000, "expires_at": 5_000},
        headers={"Idempotency-Key": "a"},
    )
    await client.post(
        f"/admin/v1/tenants/{tenant_id}/grants",
        json={"amount": 50, "effective_at": 3_000, "priority": -1},
        headers={"Idempotency-Key": "b"},
    )
    usage = UsageRecorded(event_id="req-1", tenant_id=tenant_id, amount=30, occurred_at=2_000, model="m")
    await archive_events(session_factory, [usage, *publisher.events])
    first, second = (event.grant_id for event in publisher.events)

    assert (await balance(client, tenant_id, 999))["balance"] == 0
    at_2500 = await balance(client, tenant_id, 2_500)
    assert (at_2500["balance"], at_2500["overage"]) == (70, 0)
    assert [(b["grant_id"], b["remaining"], b["expires_at"]) for b in at_2500["blocks"]] == [
        (first, 70, 5_000)
    ]
    at_4000 = await balance(client, tenant_id, "1970-01-01T00:00:04Z")
    assert at_4000["at"] == 4_000 and at_4000["balance"] == 120
    assert [block["grant_id"] for block in at_4000["blocks"]] == [second, first]  # priority -1 is drawn first
    assert (await balance(client, tenant_id, 5_000))["balance"] == 50  # the first block expired


async def test_balance_defaults_to_now(client, tenant_id, clock, session_factory):
    grant = CreditGranted(
        event_id="e1",
        tenant_id=tenant_id,
        grant_id="g1",
        amount=10,
        effective_at=clock.now_ms,
        expires_at=None,
    )
    await archive_events(session_factory, [grant])

    response = await client.get(f"/admin/v1/tenants/{tenant_id}/balance")

    assert response.json()["at"] == clock.now_ms and response.json()["balance"] == 10
    clock.now_ms -= 1
    assert (await client.get(f"/admin/v1/tenants/{tenant_id}/balance")).json()["balance"] == 0


def random_events(tenant_id: str, seed: int, count: int) -> list:
    rng = random.Random(seed)
    events, grant_ids = [], []
    for index in range(count):
        kind = rng.choices(["grant", "void", "usage"], weights=[3, 1, 6])[0]
        at = rng.randrange(0, 10_000)
        if kind == "grant" or not grant_ids:
            grant_id = f"g{index}"
            grant_ids.append(grant_id)
            expires_at = at + rng.randrange(1, 5_000) if rng.random() < 0.7 else None
            events.append(
                CreditGranted(
                    event_id=f"e{index}",
                    tenant_id=tenant_id,
                    grant_id=grant_id,
                    amount=rng.randrange(1, 500),
                    effective_at=at,
                    expires_at=expires_at,
                    priority=rng.randrange(0, 3),
                )
            )
        elif kind == "void":
            events.append(
                GrantVoided(
                    event_id=f"e{index}", tenant_id=tenant_id, grant_id=rng.choice(grant_ids), voided_at=at
                )
            )
        else:
            events.append(
                UsageRecorded(
                    event_id=f"e{index}",
                    tenant_id=tenant_id,
                    amount=rng.randrange(0, 200),
                    occurred_at=at,
                    model="m",
                    prompt_tokens=3,
                    completion_tokens=4,
                )
            )
    return events


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_balance_at_past_times_after_out_of_order_events_matches_the_ledger(
    client, tenant_id, session_factory, seed
):
    events = random_events(tenant_id, seed, count=150)
    oracle = TenantLedger(tenant_id)
    for event in sorted(events, key=event_order_key):
        oracle.apply(event)
    arrival = list(events)
    random.Random(seed).shuffle(arrival)
    duplicates = arrival[:20]
    for start in range(0, len(arrival), 40):  # several batches, then some duplicates
        await archive_events(session_factory, arrival[start : start + 40], first_offset=start)
    await archive_events(session_factory, duplicates, first_offset=len(arrival))

    times = sorted(
        {0, 10_500} | {event.timestamp for event in events} | {event.timestamp - 1 for event in events}
    )
    for at in random.Random(seed).sample([t for t in times if t >= 0], 40):
        view = await balance(client, tenant_id, at)
        assert view["balance"] == oracle.balance_at(at), at
        assert view["overage"] == oracle.overage_at(at), at
        assert [
            (
                b["grant_id"],
                b["amount"],
                b["remaining"],
                b["effective_at"],
                b["expires_at"],
                b["priority"],
                tuple(b["models"]),
            )
            for b in view["blocks"]
        ] == [tuple(block) for block in oracle.blocks_at(at)], at


async def test_balance_refusals_name_the_field(client, tenant_id):
    unknown = await client.get("/admin/v1/tenants/tn_missing/balance")
    bad_time = await client.get(f"/admin/v1/tenants/{tenant_id}/balance", params={"at": "soon"})

    assert (unknown.status_code, unknown.json()["detail"]["field"]) == (404, "tenant_id")
    assert (bad_time.status_code, bad_time.json()["detail"]["field"]) == (422, "at")


async def test_balance_needing_more_events_than_the_limit_is_503(session_factory, tenant_id, publisher):
    app = admin_api(session_factory, publisher, ADMIN_TOKEN, settings=AdminSettings(balance_events_max=2))
    usages = [
        UsageRecorded(event_id=f"r{n}", tenant_id=tenant_id, amount=1, occurred_at=n, model="m")
        for n in range(3)
    ]
    await archive_events(session_factory, usages)
    async with admin_client(app, ADMIN_TOKEN) as limited:
        response = await limited.get(f"/admin/v1/tenants/{tenant_id}/balance")

    assert response.status_code == 503
    assert "balance_events_max=2" in response.json()["detail"]["message"]
