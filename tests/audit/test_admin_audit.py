"""Who did what: named admin credentials with roles (finance read-only), TOLLGATE_ADMIN_TOKEN as the
bootstrap operator, and the append-only admin audit log: every action with its credential, request id
and event ids, hash-chained and signed, so `tollgate audit verify` catches an edited row."""

from __future__ import annotations

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI
from sqlalchemy import text

from gateway.admin.audit_log import _signer
from streams.audit_verify import admin_log, check_admin_log
from tests.admin.conftest import RecordingPublisher, SettableClock
from tests.audit.helpers import KEY
from tests.fixtures.admin_api import admin_api, admin_client

BOOTSTRAP = "test-admin-token-0123456789abcdef"


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
async def app(session_factory, publisher, tmp_path, monkeypatch) -> FastAPI:
    key_path = tmp_path / "signing-key.pem"
    key_path.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    monkeypatch.setenv("TOLLGATE_AUDIT_SIGNING_KEY_PATH", str(key_path))
    _signer.cache_clear()
    yield admin_api(session_factory, publisher, BOOTSTRAP, clock=SettableClock())
    _signer.cache_clear()


async def create(bootstrap: httpx.AsyncClient, name: str, role: str) -> str:
    response = await bootstrap.post("/admin/v1/credentials", json={"name": name, "role": role})
    assert response.status_code == 201, response.text
    assert response.json()["role"] == role
    return response.json()["secret"]


async def test_finance_reads_but_cannot_grant_or_void_and_every_action_is_logged_with_its_actor(
    app, publisher, session_factory
):
    async with admin_client(app, BOOTSTRAP) as bootstrap:
        finance_secret = await create(bootstrap, "fiona", "finance")
        operator_secret = await create(bootstrap, "oscar", "operator")
        tenant = (await bootstrap.post("/admin/v1/tenants", json={"name": "Acme", "tier": "pro"})).json()
    tenant_id = tenant["tenant_id"]

    async with admin_client(app, finance_secret) as finance:
        refused = await finance.post(
            f"/admin/v1/tenants/{tenant_id}/grants", json={"amount": 100}, headers={"Idempotency-Key": "f-1"}
        )
        assert refused.status_code == 403 and "read-only" in refused.json()["detail"]["message"]
        assert (await finance.get(f"/admin/v1/tenants/{tenant_id}/balance")).status_code == 200
        assert (await finance.get("/admin/v1/audit/log")).status_code == 200
        assert (
            await finance.post("/admin/v1/credentials", json={"name": "x", "role": "operator"})
        ).status_code == 403

    async with admin_client(app, operator_secret) as operator:
        granted = await operator.post(
            f"/admin/v1/tenants/{tenant_id}/grants",
            json={"amount": 100},
            headers={"Idempotency-Key": "o-1", "X-Request-Id": "req-grant-1"},
        )
        assert granted.status_code == 201, granted.text
        assert granted.headers["x-request-id"] == "req-grant-1"
        grant_id = granted.json()["grant_id"]
        async with admin_client(app, finance_secret) as finance:
            voiding = await finance.post(f"/admin/v1/grants/{grant_id}/void")
            assert voiding.status_code == 403
        assert (await operator.post(f"/admin/v1/grants/{grant_id}/void")).status_code == 200

    async with admin_client(app, BOOTSTRAP) as bootstrap:
        assert (await bootstrap.post("/admin/v1/credentials/fiona/revoke")).status_code == 200
        log = (await bootstrap.get("/admin/v1/audit/log")).json()
    async with admin_client(app, finance_secret) as revoked:
        assert (await revoked.get(f"/admin/v1/tenants/{tenant_id}/balance")).status_code == 401

    actions = [(row["credential_name"], row["action"]) for row in log["rows"]]
    assert actions == [
        ("bootstrap", "POST /admin/v1/credentials"),
        ("bootstrap", "POST /admin/v1/credentials"),
        ("bootstrap", "POST /admin/v1/tenants"),
        ("oscar", "POST /admin/v1/tenants/{tenant_id}/grants"),
        ("oscar", "POST /admin/v1/grants/{grant_id}/void"),
        ("bootstrap", "POST /admin/v1/credentials/{name}/revoke"),
    ]  # the refused requests changed nothing and are not actions
    grant_row, void_row = log["rows"][3], log["rows"][4]
    published = {type(event).__name__: event.event_id for event in publisher.events}
    assert grant_row["event_ids"] == [published["CreditGranted"]] and grant_row["request_id"] == "req-grant-1"
    assert (
        void_row["event_ids"] == [published["GrantVoided"]] and void_row["target"] == f"grant_id={grant_id}"
    )
    assert grant_row["details"]["body"] == {"amount": 100} and grant_row["role"] == "operator"
    assert "secret" not in str(log)  # the credential's secret is shown once, never logged

    async with session_factory() as session:
        rows = await admin_log(session)
    assert check_admin_log(rows, KEY.public_key()) is None


async def test_an_edited_or_deleted_audit_row_is_named(app, session_factory):
    async with admin_client(app, BOOTSTRAP) as bootstrap:
        for name in ("a", "b", "c"):
            await create(bootstrap, name, "finance")
    with pytest.raises(Exception, match="append-only"):
        async with session_factory() as session, session.begin():
            await session.execute(text("DELETE FROM admin_audit_log WHERE sequence = 1"))
    async with session_factory() as session, session.begin():
        await session.execute(text("SET LOCAL session_replication_role = replica"))  # as a tamperer could
        await session.execute(
            text("UPDATE admin_audit_log SET credential_name = 'mallory' WHERE sequence = 2")
        )
    async with session_factory() as session:
        divergence = check_admin_log(await admin_log(session), KEY.public_key())
    assert (divergence.tenant_id, divergence.sequence, divergence.field) == ("admin-audit", 2, "credential")
    async with session_factory() as session, session.begin():
        await session.execute(text("SET LOCAL session_replication_role = replica"))
        await session.execute(text("DELETE FROM admin_audit_log WHERE sequence = 2"))
    async with session_factory() as session:
        divergence = check_admin_log(await admin_log(session), KEY.public_key())
    assert (divergence.sequence, divergence.field) == (2, "missing")


async def test_the_bootstrap_token_stays_an_operator_and_a_wrong_token_is_refused(app):
    async with admin_client(app, BOOTSTRAP) as bootstrap:
        assert (await bootstrap.get("/admin/v1/credentials")).status_code == 200
        assert (
            await bootstrap.post("/admin/v1/credentials", json={"name": "bootstrap", "role": "finance"})
        ).status_code == 422
    async with admin_client(app, "tga_" + "x" * 43) as stranger:
        assert (await stranger.get("/admin/v1/credentials")).status_code == 401
