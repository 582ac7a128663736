"""Grants and voids: the events they emit, idempotency, and refusals that name the field."""

import asyncio

import pytest

from ledger.events import CreditGranted, GrantVoided
from tests.admin.conftest import GRANT_AMOUNT_MAX

pytestmark = pytest.mark.postgres


async def grant(client, tenant_id, body, key="grant-1"):
    return await client.post(
        f"/admin/v1/tenants/{tenant_id}/grants", json=body, headers={"Idempotency-Key": key}
    )


async def test_grant_emits_credit_granted(client, tenant_id, publisher, clock):
    response = await grant(
        client, tenant_id, {"amount": 500, "expires_at": clock.now_ms + 1_000, "priority": 2}
    )

    assert response.status_code == 201
    body = response.json()
    assert publisher.events == [
        CreditGranted(
            event_id=body["event_id"],
            tenant_id=tenant_id,
            grant_id=body["grant_id"],
            amount=500,
            effective_at=clock.now_ms,
            expires_at=clock.now_ms + 1_000,
            priority=2,
        )
    ]
    assert body["voided_at"] is None and "Idempotent-Replayed" not in response.headers


async def test_grant_takes_iso_8601_or_epoch_ms(client, tenant_id, publisher):
    iso = await grant(
        client,
        tenant_id,
        {"amount": 1, "effective_at": "2024-01-01T00:00:00Z", "expires_at": "2024-01-01T01:00:00.250+01:00"},
        key="iso",
    )
    epoch = await grant(
        client,
        tenant_id,
        {"amount": 1, "effective_at": 1_704_067_200_000, "expires_at": "1704067200250"},
        key="epoch",
    )

    assert iso.status_code == 201 and epoch.status_code == 201
    assert (iso.json()["effective_at"], iso.json()["expires_at"]) == (1_704_067_200_000, 1_704_067_200_250)
    assert (epoch.json()["effective_at"], epoch.json()["expires_at"]) == (
        1_704_067_200_000,
        1_704_067_200_250,
    )


async def test_repeated_idempotency_key_returns_the_first_grant_and_grants_nothing_more(
    client, tenant_id, publisher, clock
):
    first = await grant(client, tenant_id, {"amount": 500})
    clock.now_ms += 60_000
    repeat = await grant(client, tenant_id, {"amount": 500})
    other_key = await grant(client, tenant_id, {"amount": 500}, key="grant-2")

    assert repeat.status_code == 201 and repeat.headers["Idempotent-Replayed"] == "true"
    assert repeat.json() == first.json()
    assert other_key.json()["grant_id"] != first.json()["grant_id"]
    assert [event.grant_id for event in publisher.events] == [
        first.json()["grant_id"],
        other_key.json()["grant_id"],
    ]


async def test_idempotency_key_reused_with_another_body_is_409(client, tenant_id, publisher):
    await grant(client, tenant_id, {"amount": 500})

    response = await grant(client, tenant_id, {"amount": 501})

    assert response.status_code == 409
    assert response.json()["detail"]["field"] == "Idempotency-Key"
    assert len(publisher.events) == 1


async def test_grant_retried_after_the_bus_failed_publishes_the_same_event_once(client, tenant_id, publisher):
    publisher.failures_left = 1

    failed = await grant(client, tenant_id, {"amount": 500})
    retried = await grant(client, tenant_id, {"amount": 500})
    repeated = await grant(client, tenant_id, {"amount": 500})

    assert failed.status_code == 503 and failed.headers["Retry-After"]
    assert retried.status_code == 201 and repeated.status_code == 201
    assert [event.event_id for event in publisher.events] == [retried.json()["event_id"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"amount": 0}, "amount", id="zero"),
        pytest.param({"amount": -5}, "amount", id="negative"),
        pytest.param({"amount": GRANT_AMOUNT_MAX + 1}, "amount", id="over-max"),
        pytest.param({"amount": 1.5}, "amount", id="fraction"),
        pytest.param({"amount": "10"}, "amount", id="string"),
        pytest.param({}, "amount", id="missing"),
        pytest.param(
            {"amount": 5, "effective_at": 2_000, "expires_at": 2_000}, "expires_at", id="expiry-at-start"
        ),
        pytest.param(
            {"amount": 5, "effective_at": 2_000, "expires_at": 1_000}, "expires_at", id="expiry-before"
        ),
        pytest.param({"amount": 5, "effective_at": "2024-01-01T00:00:00"}, "effective_at", id="naive-iso"),
        pytest.param({"amount": 5, "effective_at": "yesterday"}, "effective_at", id="not-a-time"),
        pytest.param({"amount": 5, "expires_at": -1}, "expires_at", id="negative-time"),
        pytest.param({"amount": 5, "priority": 2**40}, "priority", id="priority-range"),
    ],
)
async def test_bad_grant_is_refused_naming_the_field(client, tenant_id, publisher, body, field):
    response = await grant(client, tenant_id, body)

    assert response.status_code == 422, response.text
    assert response.json()["detail"]["field"] == field
    assert response.json()["detail"]["message"].startswith(f"{field}: ")
    assert publisher.events == []


async def test_grant_refusals_for_tenant_header_and_json(client, tenant_id, publisher):
    unknown = await grant(client, "tn_missing", {"amount": 5})
    no_key = await client.post(f"/admin/v1/tenants/{tenant_id}/grants", json={"amount": 5})
    malformed = await client.post(
        f"/admin/v1/tenants/{tenant_id}/grants",
        content=b'{"amount": 5,,}',
        headers={"Idempotency-Key": "k", "Content-Type": "application/json"},
    )

    assert (unknown.status_code, unknown.json()["detail"]["field"]) == (404, "tenant_id")
    assert (no_key.status_code, no_key.json()["detail"]["field"]) == (422, "Idempotency-Key")
    assert (malformed.status_code, malformed.json()["detail"]["field"]) == (400, "body")
    assert publisher.events == []


async def test_void_emits_grant_voided_once(client, tenant_id, publisher, clock):
    granted = (await grant(client, tenant_id, {"amount": 500})).json()
    clock.now_ms += 1_000

    first = await client.post(f"/admin/v1/grants/{granted['grant_id']}/void")
    clock.now_ms += 1_000
    again = await client.post(f"/admin/v1/grants/{granted['grant_id']}/void")

    assert first.status_code == 200 and again.json() == first.json()
    assert first.json()["voided_at"] == clock.now_ms - 1_000
    assert publisher.events[1:] == [
        GrantVoided(
            event_id=first.json()["void_event_id"],
            tenant_id=tenant_id,
            grant_id=granted["grant_id"],
            voided_at=clock.now_ms - 1_000,
        )
    ]


async def test_void_of_unknown_grant_is_404_naming_grant_id(client, publisher):
    response = await client.post("/admin/v1/grants/gr_missing/void")

    assert response.status_code == 404
    assert response.json()["detail"]["field"] == "grant_id"
    assert publisher.events == []


async def test_concurrent_requests_with_one_idempotency_key_grant_once(client, tenant_id, publisher):
    responses = await asyncio.gather(
        *(grant(client, tenant_id, {"amount": 77}, key="race") for _ in range(4))
    )

    assert {response.status_code for response in responses} == {201}
    assert len({response.json()["grant_id"] for response in responses}) == 1
    assert sum("Idempotent-Replayed" not in response.headers for response in responses) == 1
    assert len({event.event_id for event in publisher.events}) == 1
