"""GET /v1/dashboard/billing/credit_grants (issue 16, point 1): a tenant reads its own credit with its API
key, in the shape of OpenAI's legacy endpoint (amounts in credits, times in epoch seconds), and never
another tenant's: two tenants' keys each see only their own grants."""

from __future__ import annotations

import httpx
import pytest

from gateway.ledger_view import wall_clock_ms
from ledger.events import CreditGranted, GrantVoided, UsageRecorded
from storage.database import build_async_engine, build_session_factory
from tests.gateway.conftest import RecordingAdmission, gateway_settings, insert_tenant_with_key, start_gateway
from tests.gateway.ledger_rows import project_events

pytestmark = pytest.mark.postgres

HOUR_MS = 3_600_000


@pytest.fixture
def gateway(database_url):
    running = start_gateway(database_url, gateway_settings(["http://127.0.0.1:9"]), RecordingAdmission())
    yield running
    running.server.stop()


def history(tenant_id: str, now_ms: int, scale: int) -> list:
    """In effect: a (1000 x scale, expiring in a day), b (300 x scale); pending: c (50 x scale); voided
    before it started: d; used 400 x scale (drawn from a first: soonest expiry)."""
    return [
        CreditGranted(
            event_id=f"{tenant_id}-a",
            tenant_id=tenant_id,
            grant_id=f"{tenant_id}-a",
            amount=1_000 * scale,
            effective_at=now_ms - HOUR_MS,
            expires_at=now_ms + 24 * HOUR_MS,
        ),
        CreditGranted(
            event_id=f"{tenant_id}-b",
            tenant_id=tenant_id,
            grant_id=f"{tenant_id}-b",
            amount=300 * scale,
            effective_at=now_ms - 2 * HOUR_MS,
        ),
        CreditGranted(
            event_id=f"{tenant_id}-c",
            tenant_id=tenant_id,
            grant_id=f"{tenant_id}-c",
            amount=50 * scale,
            effective_at=now_ms + HOUR_MS,
        ),
        CreditGranted(
            event_id=f"{tenant_id}-d",
            tenant_id=tenant_id,
            grant_id=f"{tenant_id}-d",
            amount=7,
            effective_at=now_ms + HOUR_MS,
        ),
        GrantVoided(
            event_id=f"{tenant_id}-v", tenant_id=tenant_id, grant_id=f"{tenant_id}-d", voided_at=now_ms
        ),
        UsageRecorded(
            event_id=f"{tenant_id}-u",
            tenant_id=tenant_id,
            amount=400 * scale,
            occurred_at=now_ms - 1_000,
            model="m",
        ),
    ]


async def test_each_key_reads_its_own_tenants_credit_grants_in_openais_shape(
    gateway, database_url, database_settings
):
    acme = insert_tenant_with_key(database_url, "acme")
    globex = insert_tenant_with_key(database_url, "globex")
    now_ms = wall_clock_ms()
    engine = build_async_engine(database_url, database_settings)
    try:
        sessions = build_session_factory(engine)
        await project_events(sessions, history("acme", now_ms, 1), now_ms)
        await project_events(sessions, history("globex", now_ms, 3), now_ms)
    finally:
        await engine.dispose()

    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        answers = {}
        for tenant in (acme, globex):
            response = await http.get(
                "/v1/dashboard/billing/credit_grants", headers={"Authorization": f"Bearer {tenant.key}"}
            )
            assert response.status_code == 200, response.text
            answers[tenant.tenant_id] = response.json()
        anonymous = await http.get("/v1/dashboard/billing/credit_grants")

    acme_summary = answers["acme"]
    assert acme_summary == {
        "object": "credit_summary",
        "total_granted": 1_300.0,  # the grants in effect now (c is pending)
        "total_used": 400.0,
        "total_available": 900.0,
        "grants": {
            "object": "list",
            "data": [
                {
                    "object": "credit_grant",
                    "id": "acme-b",
                    "grant_amount": 300.0,
                    "used_amount": 0.0,
                    "effective_at": (now_ms - 2 * HOUR_MS) / 1000,
                    "expires_at": None,
                },
                {
                    "object": "credit_grant",
                    "id": "acme-a",
                    "grant_amount": 1_000.0,
                    "used_amount": 400.0,
                    "effective_at": (now_ms - HOUR_MS) / 1000,
                    "expires_at": (now_ms + 24 * HOUR_MS) / 1000,
                },
                {
                    "object": "credit_grant",
                    "id": "acme-c",
                    "grant_amount": 50.0,
                    "used_amount": 0.0,
                    "effective_at": (now_ms + HOUR_MS) / 1000,
                    "expires_at": None,
                },
            ],
        },
    }
    globex_summary = answers["globex"]
    assert [grant["id"] for grant in globex_summary["grants"]["data"]] == ["globex-b", "globex-a", "globex-c"]
    assert (globex_summary["total_granted"], globex_summary["total_available"]) == (3_900.0, 2_700.0)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
