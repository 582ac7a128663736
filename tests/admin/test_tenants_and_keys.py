"""Tenants and API keys through the admin API, and resolve_key as the gateway's auth will call it."""

import hashlib

import psycopg
import pytest

from gateway.api_keys import resolve_key, split_presented_key

pytestmark = pytest.mark.postgres


async def test_create_tenant_returns_it(client, clock):
    response = await client.post("/admin/v1/tenants", json={"name": "  Acme Corp ", "tier": "enterprise"})

    assert response.status_code == 201
    body = response.json()
    assert body["tenant_id"].startswith("tn_")
    assert body == {
        "tenant_id": body["tenant_id"],
        "name": "Acme Corp",
        "tier": "enterprise",
        "created_at": clock.now_ms,
    }


@pytest.mark.parametrize(
    ("content", "status", "field"),
    [
        pytest.param(b'{"name": "Acme", "tier": "platinum"}', 422, "tier", id="unknown-tier"),
        pytest.param(b'{"tier": "pro"}', 422, "name", id="missing-name"),
        pytest.param(b'{"name": "", "tier": "pro"}', 422, "name", id="empty-name"),
        pytest.param(b'{"name": "Acme", "tier": "pro", "plan": 1}', 422, "plan", id="unknown-field"),
        pytest.param(b'{"name": "Acme", "tier": ', 400, "body", id="malformed-json"),
    ],
)
async def test_create_tenant_refuses_bad_input_naming_the_field(client, content, status, field):
    response = await client.post(
        "/admin/v1/tenants", content=content, headers={"Content-Type": "application/json"}
    )

    assert response.status_code == status
    detail = response.json()["detail"]
    assert detail["field"] == field
    assert detail["message"].startswith(f"{field}: ")


async def test_new_key_resolves_to_its_tenant_and_only_its_hash_is_stored(
    client, tenant_id, session_factory, database_url
):
    response = await client.post(f"/admin/v1/tenants/{tenant_id}/keys")

    assert response.status_code == 201
    assert response.headers["Cache-Control"] == "no-store"
    created = response.json()
    prefix, secret = split_presented_key(created["key"])
    assert created["key"].startswith(f"tg_{prefix}_") and created["prefix"] == prefix
    async with session_factory() as session:
        tenant = await resolve_key(session, created["key"])
        assert tenant is not None and tenant.tenant_id == tenant_id
        assert (
            await resolve_key(session, created["key"][:-1] + ("A" if created["key"][-1] != "A" else "B"))
            is None
        )
        assert await resolve_key(session, f"tg_{'0' * 12}_{secret}") is None
        assert await resolve_key(session, "not a key") is None
    with psycopg.connect(database_url) as connection:
        row = connection.execute("SELECT * FROM api_keys WHERE key_id = %s", (created["key_id"],)).fetchone()
    assert bytes(row[3]) == hashlib.sha256(secret.encode()).digest()
    assert all(secret not in str(value) for value in row)


async def test_key_for_unknown_tenant_is_404_naming_tenant_id(client):
    response = await client.post("/admin/v1/tenants/tn_missing/keys")

    assert response.status_code == 404
    assert response.json()["detail"]["field"] == "tenant_id"


async def test_revoked_key_no_longer_resolves_and_revoking_again_keeps_the_first_time(
    client, tenant_id, clock, session_factory
):
    created = (await client.post(f"/admin/v1/tenants/{tenant_id}/keys")).json()
    other = (await client.post(f"/admin/v1/tenants/{tenant_id}/keys")).json()

    first = await client.delete(f"/admin/v1/keys/{created['key_id']}")
    clock.now_ms += 5_000
    again = await client.delete(f"/admin/v1/keys/{created['key_id']}")

    assert first.status_code == 200 and again.status_code == 200
    assert first.json() == {
        "key_id": created["key_id"],
        "tenant_id": tenant_id,
        "revoked_at": clock.now_ms - 5_000,
    }
    assert again.json() == first.json()
    async with session_factory() as session:
        assert await resolve_key(session, created["key"]) is None
        assert (await resolve_key(session, other["key"])).tenant_id == tenant_id


async def test_revoking_unknown_key_is_404_naming_key_id(client):
    response = await client.delete("/admin/v1/keys/key_missing")

    assert response.status_code == 404
    assert response.json()["detail"]["field"] == "key_id"
