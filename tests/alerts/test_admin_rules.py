"""The admin API's alert and top-up rules: each PUT/DELETE publishes its rule event (validated as the fold
decodes it), the GETs answer the rules folded from the archived events, finance may read but not change
them, and every change is in the admin audit log with the event it published."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI

from gateway.admin.audit_log import _signer
from ledger.events import AlertRuleRemoved, AlertRuleSet, TopUpRuleSet
from tests.admin.conftest import RecordingPublisher, SettableClock, archive_events
from tests.audit.helpers import KEY
from tests.audit.test_admin_audit import create
from tests.fixtures.admin_api import admin_api, admin_client

pytestmark = pytest.mark.postgres

BOOTSTRAP = "test-admin-token-0123456789abcdef"


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def clock() -> SettableClock:
    return SettableClock()


@pytest.fixture
async def app(session_factory, publisher, clock, tmp_path, monkeypatch) -> FastAPI:
    key_path = tmp_path / "signing-key.pem"
    key_path.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    monkeypatch.setenv("TOLLGATE_AUDIT_SIGNING_KEY_PATH", str(key_path))
    _signer.cache_clear()
    yield admin_api(session_factory, publisher, BOOTSTRAP, clock=clock)
    _signer.cache_clear()


async def test_rules_are_published_folded_and_listed_and_only_operators_change_them(
    app, publisher, clock, session_factory
):
    async with admin_client(app, BOOTSTRAP) as admin:
        tenant = (await admin.post("/admin/v1/tenants", json={"name": "Acme", "tier": "pro"})).json()[
            "tenant_id"
        ]
        finance_secret = await create(admin, "fiona", "finance")
        rules = f"/admin/v1/tenants/{tenant}/alert-rules"
        top_ups = f"/admin/v1/tenants/{tenant}/top-up-rules"
        low = await admin.put(f"{rules}/low", json={"kind": "balance_below", "threshold": 500})
        assert low.status_code == 200, low.text
        clock.now_ms += 1
        soon = {"kind": "grant_expiring", "window_ms": 86_400_000}
        assert (await admin.put(f"{rules}/soon", json=soon)).status_code == 200
        clock.now_ms += 1
        auto = {"threshold": 100, "target": 1_000, "price": 900, "currency": "USD", "monthly_count_max": 2}
        assert (await admin.put(f"{top_ups}/auto", json=auto)).status_code == 200
        clock.now_ms += 1
        assert (await admin.delete(f"{rules}/soon")).status_code == 200

        invalid = await admin.put(f"{rules}/bad", json={"kind": "balance_below"})
        assert invalid.status_code == 422 and invalid.json()["detail"]["field"] == "threshold"
        uncapped = await admin.put(
            f"{top_ups}/bad", json={"threshold": 1, "amount": 5, "category": "promotional"}
        )
        assert uncapped.status_code == 422 and uncapped.json()["detail"]["field"] == "monthly_count_max"
        assert (await admin.put(f"{rules}/{'x' * 65}", json=soon)).status_code == 422
        assert (await admin.put("/admin/v1/tenants/nobody/alert-rules/low", json=soon)).status_code == 404

    kinds = [type(event) for event in publisher.events]
    assert kinds == [AlertRuleSet, AlertRuleSet, TopUpRuleSet, AlertRuleRemoved]
    assert publisher.events[0].threshold == 500 and publisher.events[2].target == 1_000
    await archive_events(session_factory, publisher.events)  # as the projector archives ledger.events

    async with admin_client(app, finance_secret) as finance:
        listed = (await finance.get(f"/admin/v1/tenants/{tenant}/alert-rules")).json()
        assert [(r["rule_id"], r["kind"], r["threshold"]) for r in listed] == [("low", "balance_below", 500)]
        [top_up] = (await finance.get(f"/admin/v1/tenants/{tenant}/top-up-rules")).json()
        assert (top_up["rule_id"], top_up["target"], top_up["price"]) == ("auto", 1_000, 900)
        refused = await finance.put(f"/admin/v1/tenants/{tenant}/alert-rules/x", json=soon)
        assert refused.status_code == 403
        assert (await finance.delete(f"/admin/v1/tenants/{tenant}/alert-rules/low")).status_code == 403

    async with admin_client(app, BOOTSTRAP) as admin:
        taken = await admin.put(f"/admin/v1/tenants/{tenant}/alert-rules/auto", json=soon)
        assert taken.status_code == 409 and taken.json()["detail"]["field"] == "rule_id"
        log = (await admin.get("/admin/v1/audit/log")).json()["rows"]
    changes = [(row["action"], row["event_ids"]) for row in log if "rules" in row["action"]]
    assert changes == [
        ("PUT /admin/v1/tenants/{tenant_id}/alert-rules/{rule_id}", [publisher.events[0].event_id]),
        ("PUT /admin/v1/tenants/{tenant_id}/alert-rules/{rule_id}", [publisher.events[1].event_id]),
        ("PUT /admin/v1/tenants/{tenant_id}/top-up-rules/{rule_id}", [publisher.events[2].event_id]),
        ("DELETE /admin/v1/tenants/{tenant_id}/alert-rules/{rule_id}", [publisher.events[3].event_id]),
    ]
