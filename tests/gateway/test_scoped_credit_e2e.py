"""Credits scoped to models end to end through the HTTP API (the gateway, a real worker, Kafka, the
processor, the projector and Postgres: tests/fixtures/stack.py): a tenant whose only credit is scoped to
another model is refused (429, credit_balance_exhausted) for the stack's model; a tenant whose only credit
is scoped to the stack's model is admitted, and its usage draws that grant; a first scoped grant
backdated over usage already folded takes that usage."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

MODEL = "tollgate-tiny"  # the stack's worker serves it
CREDIT = 1_000_000


def scoped_tenant(stack, models: list[str]) -> tuple[str, str, str]:
    """(tenant id, API key, grant id) of a new tenant whose only grant is scoped to `models`."""
    tenant = stack.new_tenant("pro", 0)
    granted = stack.admin.post(
        f"/admin/v1/tenants/{tenant.tenant_id}/grants",
        json={"amount": CREDIT, "models": models},
        headers={"Idempotency-Key": f"e2e-{uuid.uuid4().hex}"},
    )
    assert granted.status_code == 201, granted.text
    assert granted.json()["models"] == models
    stack.wait_balance(tenant.tenant_id, CREDIT)
    stack.wait_admission_view(tenant.tenant_id, CREDIT)
    return tenant.tenant_id, tenant.key, granted.json()["grant_id"]


def complete(stack, key: str) -> httpx.Response:
    return httpx.post(
        stack.gateway_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        timeout=60,
    )


def test_credit_scoped_to_the_requests_model_admits_it_and_credit_scoped_to_another_does_not(stack):
    _, other_key, _ = scoped_tenant(stack, ["gpt-x"])
    refused = complete(stack, other_key)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "credit_balance_exhausted"

    tenant_id, key, grant_id = scoped_tenant(stack, [MODEL, "gpt-x"])
    admitted = complete(stack, key)
    assert admitted.status_code == 200, admitted.text
    entry = stack.usage_entry(tenant_id, admitted.headers["x-request-id"])
    assert [allocation[0] for allocation in entry["allocations"]] == [grant_id]
    assert entry["overage"] == 0


def test_a_backdated_first_scoped_grant_takes_usage_already_drawn_from_unscoped_credit(stack):
    """A request is served and folded against the tenant's unscoped grant; then the tenant's first grant
    scoped to that model arrives, backdated to before the request: the fold moves the request's cost onto
    the scoped grant (as if the grants had come first) and the unscoped grant is whole again."""
    tenant = stack.new_tenant("pro", CREDIT)
    admitted = complete(stack, tenant.key)
    assert admitted.status_code == 200, admitted.text
    entry = stack.usage_entry(tenant.tenant_id, admitted.headers["x-request-id"])
    cost, [[unscoped_id, *_]] = entry["amount"], entry["allocations"]
    assert cost > 0
    granted = stack.admin.post(
        f"/admin/v1/tenants/{tenant.tenant_id}/grants",
        json={"amount": CREDIT, "models": [MODEL], "effective_at": entry["occurred_at"] - 60_000},
        headers={"Idempotency-Key": f"e2e-{uuid.uuid4().hex}"},
    )
    assert granted.status_code == 201, granted.text
    scoped_id = granted.json()["grant_id"]
    expected = {unscoped_id: CREDIT, scoped_id: CREDIT - cost}
    deadline = time.monotonic() + 60
    while True:
        body = stack.admin.get(f"/admin/v1/tenants/{tenant.tenant_id}/balance").json()
        remaining = {block["grant_id"]: block["remaining"] for block in body["blocks"]}
        if remaining == expected:
            break
        assert time.monotonic() < deadline, (remaining, expected)
        time.sleep(0.1)
    assert body["overage"] == 0
