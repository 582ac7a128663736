"""Grants scoped to models through the admin API: the event carries the models, the grant shows them, the
request refuses duplicates and too many, and an unscoped grant's idempotency fingerprint is unchanged."""

import pytest

from gateway.admin.commands import request_fingerprint
from gateway.admin.models import GrantCreate
from ledger.events import GRANT_MODELS_MAX, CreditGranted
from tests.admin.test_grants import grant

pytestmark = pytest.mark.postgres


async def test_a_scoped_grant_emits_its_models_and_shows_them(client, tenant_id, publisher, clock):
    response = await grant(client, tenant_id, {"amount": 300, "models": ["gpt-x", "gpt-x-mini"]})

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["models"] == ["gpt-x", "gpt-x-mini"]
    assert publisher.events == [
        CreditGranted(
            event_id=body["event_id"],
            tenant_id=tenant_id,
            grant_id=body["grant_id"],
            amount=300,
            effective_at=clock.now_ms,
            models=("gpt-x", "gpt-x-mini"),
        )
    ]
    unscoped = await grant(client, tenant_id, {"amount": 1}, key="unscoped")
    assert unscoped.json()["models"] == [] and publisher.events[-1].models == ()


@pytest.mark.parametrize(
    "models",
    [["gpt-x", "gpt-x"], [f"model-{n}" for n in range(GRANT_MODELS_MAX + 1)], [""], ["bad\x00name"]],
)
async def test_bad_models_are_refused_naming_the_field(client, tenant_id, publisher, models):
    response = await grant(client, tenant_id, {"amount": 1, "models": models})

    assert response.status_code == 422
    assert response.json()["detail"]["field"].startswith("models"), response.text
    assert publisher.events == []


def test_an_unscoped_grants_fingerprint_is_the_one_before_models_existed():
    import hashlib
    import json

    request = GrantCreate(amount=5)
    before = {key: value for key, value in request.model_dump().items() if key != "models"}
    expected = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).digest()
    assert request_fingerprint(request) == expected
    assert request_fingerprint(GrantCreate(amount=5, models=["m"])) != request_fingerprint(request)


async def test_the_balance_shows_each_blocks_models_and_scoped_usage_draws_its_grant(
    client, tenant_id, publisher, session_factory, clock
):
    from ledger.events import UsageRecorded
    from tests.admin.conftest import archive_events

    await grant(client, tenant_id, {"amount": 100, "effective_at": 1_000, "models": ["gpt-x"]}, key="x")
    await grant(client, tenant_id, {"amount": 50, "effective_at": 1_000, "priority": -1}, key="any")
    usage = UsageRecorded(event_id="req-1", tenant_id=tenant_id, amount=30, occurred_at=2_000, model="gpt-x")
    await archive_events(session_factory, [*publisher.events, usage])

    response = await client.get(f"/admin/v1/tenants/{tenant_id}/balance", params={"at": 2_500})
    assert response.status_code == 200, response.text
    blocks = {block["remaining"]: block["models"] for block in response.json()["blocks"]}
    assert blocks == {70: ["gpt-x"], 50: []}  # the unscoped grant, drawn first otherwise, kept its credit
