"""`tollgate admin credentials create|list|revoke` against the admin API served over a real socket, on a
real Postgres: the secret is printed once, the list shows names and roles but no secret, a finance
credential reads but cannot grant, and a revoked one is refused."""

from __future__ import annotations

import json

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI
from typer.testing import CliRunner

from gateway.admin.audit_log import _signer
from storage.database import build_async_engine, build_session_factory
from tests.admin.conftest import RecordingPublisher, SettableClock
from tests.audit.helpers import KEY
from tests.fixtures.admin_api import admin_api
from tests.gateway.servers import ThreadServer
from tollgate import cli

pytestmark = pytest.mark.postgres

BOOTSTRAP = "test-admin-token-0123456789abcdef"


@pytest.fixture
def admin_url(database_url, database_settings, tmp_path, monkeypatch):
    key_path = tmp_path / "signing-key.pem"
    key_path.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    monkeypatch.setenv("TOLLGATE_AUDIT_SIGNING_KEY_PATH", str(key_path))
    _signer.cache_clear()

    async def build() -> FastAPI:  # in the server's own loop, with an engine bound to it
        sessions = build_session_factory(build_async_engine(database_url, database_settings))
        return admin_api(sessions, RecordingPublisher(), BOOTSTRAP, clock=SettableClock())

    server = ThreadServer(build).start()
    yield server.url
    server.stop()
    _signer.cache_clear()


def tollgate(url: str, token: str, *args: str) -> dict | list:
    result = CliRunner().invoke(cli.app, [*args], env={"TOLLGATE_URL": url, "TOLLGATE_ADMIN_TOKEN": token})
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_credentials_are_created_listed_and_revoked_from_the_command_line(admin_url):
    created = tollgate(admin_url, BOOTSTRAP, "admin", "credentials", "create", "fiona", "--role", "finance")
    assert created["name"] == "fiona" and created["role"] == "finance"
    secret = created["secret"]
    listed = json.dumps(tollgate(admin_url, BOOTSTRAP, "admin", "credentials", "list"))
    assert "fiona" in listed and "finance" in listed and secret not in listed, "the secret is shown once"

    with httpx.Client(base_url=admin_url, headers={"Authorization": f"Bearer {secret}"}) as fiona:
        assert fiona.get("/admin/v1/audit/log").status_code == 200
        tenant = fiona.post("/admin/v1/tenants", json={"name": "Acme", "tier": "pro"})
        assert tenant.status_code == 403, "finance is read-only"

        tollgate(admin_url, BOOTSTRAP, "admin", "credentials", "revoke", "fiona")
        assert fiona.get("/admin/v1/audit/log").status_code == 401
    revoked = json.dumps(tollgate(admin_url, BOOTSTRAP, "admin", "credentials", "list"))
    assert "fiona" in revoked
    log = tollgate(admin_url, BOOTSTRAP, "audit", "log")
    assert [row["action"] for row in log["rows"]] == [
        "POST /admin/v1/credentials",
        "POST /admin/v1/credentials/{name}/revoke",
    ]
