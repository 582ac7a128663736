"""The admin API's webhook endpoints over a real database: the secret once, never in listings nor the audit
log; operators create, disable and rotate (the old secret signing on for an overlap), finance reads; the
delivery log paged."""

from __future__ import annotations

import base64
import json

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from gateway.admin import AdminSettings
from storage.audit import AdminAuditRecord
from storage.webhooks import (
    SECRET_OVERLAP_MAX_MS,
    Claimed,
    Outcome,
    WebhookDelivery,
    WebhookEndpoint,
    record_attempt,
)
from tests.admin.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.postgres


async def finance_token(client) -> str:
    response = await client.post("/admin/v1/credentials", json={"name": "fin", "role": "finance"})
    assert response.status_code == 201, response.text
    return response.json()["secret"]


async def create(client, tenant_id: str, **body) -> dict:
    response = await client.post(
        f"/admin/v1/tenants/{tenant_id}/webhooks", json={"url": "https://hooks.example/a", **body}
    )
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    return response.json()


async def test_create_shows_the_secret_once_and_never_again(client, tenant_id, session_factory):
    created = await create(client, tenant_id, description="ops", alert_kinds=["depleted", "balance_below"])
    secret = created["secret"]
    assert secret.startswith("whsec_") and 24 <= len(base64.b64decode(secret[len("whsec_") :])) <= 64
    assert created["alert_kinds"] == ["balance_below", "depleted"] and created["enabled"] is True

    listed = (await client.get(f"/admin/v1/tenants/{tenant_id}/webhooks")).json()
    fetched = (await client.get(f"/admin/v1/webhooks/{created['endpoint_id']}")).json()
    assert [row["endpoint_id"] for row in listed] == [created["endpoint_id"]]
    for shown in (listed[0], fetched):
        assert "secret" not in shown and secret not in json.dumps(shown)
    async with session_factory() as session:
        audit_rows = (await session.execute(select(AdminAuditRecord))).scalars().all()
    assert [row.action for row in audit_rows if "webhooks" in row.action] == [
        "POST /admin/v1/tenants/{tenant_id}/webhooks"
    ]
    assert all(secret not in json.dumps(row.details) for row in audit_rows)

    rotated = (await client.post(f"/admin/v1/webhooks/{created['endpoint_id']}/rotate-secret")).json()
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != secret
    assert rotated["secret_rotated_at"] is not None


async def test_bad_urls_and_kinds_are_refused(client, tenant_id):
    for body in (
        {"url": "ftp://hooks.example/a"},
        {"url": "not a url"},
        {"url": "https://user:pw@hooks.example/"},
        {"url": "https://hooks.example/a", "alert_kinds": ["nope"]},
        {"url": "https://hooks.example/a", "alert_kinds": []},
    ):
        response = await client.post(f"/admin/v1/tenants/{tenant_id}/webhooks", json=body)
        assert response.status_code == 422, (body, response.text)
    response = await client.post("/admin/v1/tenants/nobody/webhooks", json={"url": "https://hooks.example/"})
    assert response.status_code == 404


async def test_finance_reads_but_may_not_create_disable_or_rotate(client, tenant_id):
    created = await create(client, tenant_id)
    endpoint = created["endpoint_id"]
    headers = {"Authorization": f"Bearer {await finance_token(client)}"}
    assert (await client.get(f"/admin/v1/tenants/{tenant_id}/webhooks", headers=headers)).status_code == 200
    assert (await client.get(f"/admin/v1/webhooks/{endpoint}/deliveries", headers=headers)).status_code == 200
    for method, path in (
        ("POST", f"/admin/v1/tenants/{tenant_id}/webhooks"),
        ("DELETE", f"/admin/v1/webhooks/{endpoint}"),
        ("POST", f"/admin/v1/webhooks/{endpoint}/rotate-secret"),
    ):
        response = await client.request(method, path, headers=headers, json={"url": "https://x.example/"})
        assert response.status_code == 403, (method, path)
    operator = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    disabled = (await client.delete(f"/admin/v1/webhooks/{endpoint}", headers=operator)).json()
    assert disabled["enabled"] is False and disabled["disabled_at"] is not None


async def test_the_delivery_log_pages_every_attempt_with_the_deliverys_state(
    client, tenant_id, session_factory
):
    endpoint = (await create(client, tenant_id))["endpoint_id"]
    async with session_factory() as session, session.begin():
        for number in range(3):
            session.add(
                WebhookDelivery(
                    endpoint_id=endpoint,
                    alert_id=f"{tenant_id}:low:{number + 1}",
                    tenant_id=tenant_id,
                    event_type="balance.below",
                    body="{}",
                    state="pending",
                    attempts=0,
                    alert_partition=0,
                    alert_offset=number,
                    scheduled_at_ms=0,
                    next_attempt_at_ms=0,
                )
            )
    async with session_factory() as session, session.begin():
        for number in range(3):
            claimed = Claimed(
                endpoint,
                f"{tenant_id}:low:{number + 1}",
                tenant_id,
                "{}",
                0,
                0,
                number,
                0,
                "",
                "",
                True,
                None,
                None,
            )
            await record_attempt(session, claimed, Outcome(10, None, "ConnectError", 3, "pending", 500))
        claimed = Claimed(
            endpoint, f"{tenant_id}:low:1", tenant_id, "{}", 1, 0, 0, 0, "", "", True, None, None
        )
        assert await record_attempt(session, claimed, Outcome(600, 204, None, 7, "delivered", None))
        stale = Claimed(endpoint, f"{tenant_id}:low:1", tenant_id, "{}", 1, 0, 0, 0, "", "", True, None, None)
        assert not await record_attempt(session, stale, Outcome(601, 204, None, 7, "delivered", None))

    first = (await client.get(f"/admin/v1/webhooks/{endpoint}/deliveries", params={"limit": 3})).json()
    rest = (
        await client.get(f"/admin/v1/webhooks/{endpoint}/deliveries", params={"since": first["next_since"]})
    ).json()
    rows = first["attempts"] + rest["attempts"]
    assert len(first["attempts"]) == 3 and len(rest["attempts"]) == 1
    assert [(row["alert_id"][-1], row["attempt"], row["outcome"]) for row in rows] == [
        ("1", 1, "retrying"),
        ("2", 1, "retrying"),
        ("3", 1, "retrying"),
        ("1", 2, "delivered"),
    ]
    assert rows[0]["error"] == "ConnectError" and rows[0]["next_retry_at"] == 500
    assert rows[0]["delivery_state"] == "delivered" and rows[1]["delivery_state"] == "pending"
    assert rows[3]["status_code"] == 204 and rows[3]["latency_ms"] == 7


async def test_rotation_keeps_the_old_secret_signing_for_the_overlap_and_never_shows_a_secret(
    client, tenant_id, session_factory, clock
):
    created = await create(client, tenant_id)
    endpoint, first = created["endpoint_id"], created["secret"]
    assert created["previous_secret_expires_at"] is None

    response = await client.post(
        f"/admin/v1/webhooks/{endpoint}/rotate-secret", json={"overlap_ms": 3_600_000}
    )
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    rotated = response.json()
    second = rotated["secret"]
    assert second.startswith("whsec_") and second != first
    assert rotated["secret_rotated_at"] == clock.now_ms
    assert rotated["previous_secret_expires_at"] == rotated["old_secret_stops_at"] == clock.now_ms + 3_600_000
    async with session_factory() as session:
        row = await session.get(WebhookEndpoint, endpoint)
    assert (row.secret, row.previous_secret) == (second, first)

    clock.now_ms += 60_000  # rotating again during the overlap: the first secret stops, the second signs on
    third = (
        await client.post(f"/admin/v1/webhooks/{endpoint}/rotate-secret", json={"overlap_ms": 1_000})
    ).json()
    async with session_factory() as session:
        row = await session.get(WebhookEndpoint, endpoint)
    assert (row.secret, row.previous_secret) == (third["secret"], second)
    assert row.previous_secret_expires_at_ms == clock.now_ms + 1_000

    listed = (await client.get(f"/admin/v1/tenants/{tenant_id}/webhooks")).json()
    fetched = (await client.get(f"/admin/v1/webhooks/{endpoint}")).json()
    assert listed == [fetched] and fetched["previous_secret_expires_at"] == clock.now_ms + 1_000
    async with session_factory() as session:
        audit_rows = (await session.execute(select(AdminAuditRecord))).scalars().all()
    rotations = [row for row in audit_rows if row.action.endswith("/rotate-secret")]
    assert [row.details["body"] for row in rotations] == [{"overlap_ms": 3_600_000}, {"overlap_ms": 1_000}]
    for shown in (json.dumps(listed), json.dumps(fetched), *(json.dumps(row.details) for row in audit_rows)):
        assert "whsec_" not in shown


async def test_rotation_without_overlap_ms_takes_the_setting_and_0_stops_the_old_secret_at_once(
    client, tenant_id, session_factory, clock
):
    endpoint = (await create(client, tenant_id))["endpoint_id"]
    rotated = (await client.post(f"/admin/v1/webhooks/{endpoint}/rotate-secret")).json()
    default = AdminSettings().webhook_secret_overlap_ms
    assert default == 86_400_000  # 24 h, like Svix
    assert rotated["previous_secret_expires_at"] == clock.now_ms + default

    clock.now_ms += 1
    stopped = (
        await client.post(f"/admin/v1/webhooks/{endpoint}/rotate-secret", json={"overlap_ms": 0})
    ).json()
    assert stopped["previous_secret_expires_at"] is None and stopped["old_secret_stops_at"] == clock.now_ms
    async with session_factory() as session:
        row = await session.get(WebhookEndpoint, endpoint)
    assert (row.secret, row.previous_secret, row.previous_secret_expires_at_ms) == (
        stopped["secret"],
        None,
        None,
    )


async def test_an_overlap_out_of_range_is_a_422_naming_the_field(client, tenant_id, session_factory):
    created = await create(client, tenant_id)
    endpoint = created["endpoint_id"]
    for body in ({"overlap_ms": -1}, {"overlap_ms": SECRET_OVERLAP_MAX_MS + 1}, {"overlap_ms": "a day"}):
        response = await client.post(f"/admin/v1/webhooks/{endpoint}/rotate-secret", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["detail"]["field"] == "overlap_ms", response.text
    response = await client.post(f"/admin/v1/webhooks/{endpoint}/rotate-secret", json={"overlap": 5})
    assert response.status_code == 422 and response.json()["detail"]["field"] == "overlap"
    longest = {"overlap_ms": SECRET_OVERLAP_MAX_MS}
    assert (
        await client.post(f"/admin/v1/webhooks/{endpoint}/rotate-secret", json=longest)
    ).status_code == 200
    async with session_factory() as session:
        row = await session.get(WebhookEndpoint, endpoint)
    assert row.previous_secret == created["secret"]  # the refused rotations changed nothing


async def test_the_table_refuses_a_previous_secret_without_its_expiry_or_scheme(
    client, tenant_id, session_factory
):
    endpoint = (await create(client, tenant_id))["endpoint_id"]
    for values in (
        {"previous_secret": "whsec_AAAA", "previous_secret_expires_at_ms": None},
        {"previous_secret": None, "previous_secret_expires_at_ms": 5},
        {"previous_secret": "plain", "previous_secret_expires_at_ms": 5},
    ):
        with pytest.raises(IntegrityError):
            async with session_factory() as session, session.begin():
                await session.execute(
                    update(WebhookEndpoint).where(WebhookEndpoint.endpoint_id == endpoint).values(**values)
                )
