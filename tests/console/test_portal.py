"""The tenant portal over HTTP: a link for tenant A shows A and nothing of B; an expired or altered link,
or none, is a 403 page; the link's token is exchanged for a cookie and a console cookie is no portal
cookie (nor the other way round)."""

from __future__ import annotations

import httpx
import pytest

from gateway.console.portal import PORTAL_COOKIE
from gateway.console.settings import ConsoleSettings
from ledger.events import UsageRecorded
from tests.console.conftest import ADMIN_TOKEN, fold_and_project

pytestmark = pytest.mark.postgres


async def tenant_with_usage(admin, session_factory, publisher, clock, name: str) -> tuple[str, str]:
    tenant_id = (await admin.post("/admin/v1/tenants", json={"name": name, "tier": "pro"})).json()[
        "tenant_id"
    ]
    grant = await admin.post(
        f"/admin/v1/tenants/{tenant_id}/grants", json={"amount": 10_000}, headers={"Idempotency-Key": name}
    )
    clock.now_ms += 60_000
    usage = UsageRecorded(
        event_id=f"u-{name}", tenant_id=tenant_id, amount=700, occurred_at=clock.now_ms - 1_000,
        model=f"model-of-{name.lower()}", prompt_tokens=10, completion_tokens=5,
    )  # fmt: skip
    granted = [e for e in publisher.events if e.tenant_id == tenant_id]
    await fold_and_project(session_factory, tenant_id, [*granted, usage], clock.now_ms)
    return tenant_id, grant.json()["grant_id"]


@pytest.fixture
async def admin(app):
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://console.test",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as client:
        yield client


async def test_a_link_for_one_tenant_shows_that_tenant_only(app, admin, session_factory, publisher, clock):
    a, grant_a = await tenant_with_usage(admin, session_factory, publisher, clock, "Alpha")
    b, grant_b = await tenant_with_usage(admin, session_factory, publisher, clock, "Bravo")
    created = await admin.post(f"/admin/v1/tenants/{a}/portal-links")
    assert created.status_code == 201, created.text
    link = created.json()
    assert link["expires_at"] == clock.now_ms + ConsoleSettings().portal_link_ttl_s * 1000
    assert link["url"].startswith("http://console.test/portal/enter/")
    assert (await admin.post("/admin/v1/tenants/tn_nobody/portal-links")).status_code == 404

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://console.test"
    ) as tenant:
        entered = await tenant.get(link["url"])
        assert entered.status_code == 303 and entered.headers["location"] == "/portal"
        cookie = entered.headers["set-cookie"]
        assert "HttpOnly" in cookie and "Path=/portal" in cookie and link["url"].split("/")[-1] not in cookie
        assert entered.headers["referrer-policy"] == "no-referrer"
        page = await tenant.get("/portal")
        assert page.status_code == 200
        assert (
            "Alpha" in page.text and a in page.text and grant_a in page.text and "model-of-alpha" in page.text
        )
        assert "Bravo" not in page.text and b not in page.text and grant_b not in page.text
        assert "model-of-bravo" not in page.text
        assert 'name="csrf"' not in page.text and '<form method="post"' not in page.text, "read-only"
        chart = (await tenant.get("/portal/burndown.json?width=64")).json()
        assert [s["grant_id"] for s in chart["series"]] == [grant_a] and chart["remaining_total"] == 9_300
        usage = (await tenant.get("/portal/usage.json")).json()
        assert [s["model"] for s in usage["series"]] == ["model-of-alpha"]
        csv = await tenant.get("/portal/statement?period=2026-11&format=csv")
        assert csv.status_code == 200 and "model-of-alpha" in csv.text and "model-of-bravo" not in csv.text
        assert (await tenant.get(f"/portal?tenant_id={b}")).text.count("Bravo") == 0, "no page takes a tenant"
        assert (await tenant.get("/console", follow_redirects=False)).status_code == 303, "no console session"

        clock.now_ms = link["expires_at"]
        expired = await tenant.get("/portal")
        assert expired.status_code == 403 and "expired" in expired.text
        assert (await tenant.get(link["url"])).status_code == 403


async def test_an_altered_link_or_none_is_refused_with_a_page_saying_so(app, admin):
    tenant_id = (await admin.post("/admin/v1/tenants", json={"name": "Alpha", "tier": "pro"})).json()[
        "tenant_id"
    ]
    url = (await admin.post(f"/admin/v1/tenants/{tenant_id}/portal-links")).json()["url"]
    body, mac = url.split("/")[-1].split(".")
    other = (await admin.post("/admin/v1/tenants", json={"name": "Bravo", "tier": "pro"})).json()["tenant_id"]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://console.test"
    ) as tenant:
        for token in (
            f"{body}.{mac[:-1]}{'A' if mac[-1] != 'A' else 'B'}",  # the signature altered
            f"{body[:-1]}{'A' if body[-1] != 'A' else 'B'}.{mac}",  # the payload altered
            f"{body}",
            "garbage",
        ):
            refused = await tenant.get(f"/portal/enter/{token}")
            assert refused.status_code == 403 and "not valid" in refused.text, token
            assert "set-cookie" not in refused.headers
        assert (await tenant.get("/portal")).status_code == 403
        tenant.cookies.set(PORTAL_COOKIE, url.split("/")[-1], path="/portal")  # the link token as a cookie
        assert (await tenant.get("/portal")).status_code == 403, "a link is not a portal session"
    assert other != tenant_id
