"""Every admin route refuses a request without the admin token, or with a wrong one."""

import pytest

from tests.admin.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.postgres

ROUTES = [
    ("POST", "/admin/v1/tenants", {"name": "Acme", "tier": "pro"}),
    ("POST", "/admin/v1/tenants/tn_x/keys", None),
    ("DELETE", "/admin/v1/keys/key_x", None),
    ("POST", "/admin/v1/tenants/tn_x/grants", {"amount": 5}),
    ("POST", "/admin/v1/grants/gr_x/void", None),
    ("GET", "/admin/v1/tenants/tn_x/balance", None),
    ("GET", "/admin/v1/tenants/tn_x/entries", None),
    ("GET", "/admin/v1/tenants/tn_x/statements?from=0&to=1", None),  # finance (issue 14)
    ("PUT", "/admin/v1/tenants/tn_x/overage-rate", {"rate_per_million_credits": None}),
    ("POST", "/admin/v1/periods/close", {"until": 1}),
]

WRONG_CREDENTIALS = [
    pytest.param(None, "required", id="no-token"),
    pytest.param(f"Bearer {ADMIN_TOKEN}x", "wrong", id="wrong-token"),
    pytest.param(f"Bearer {ADMIN_TOKEN[:-1]}", "wrong", id="truncated-token"),
    pytest.param(f"Basic {ADMIN_TOKEN}", "required", id="not-bearer"),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
@pytest.mark.parametrize(("authorization", "message"), WRONG_CREDENTIALS)
async def test_route_refuses_missing_or_wrong_token(
    client, publisher, method, path, body, authorization, message
):
    headers = {"Idempotency-Key": "k1"}
    if authorization is not None:
        headers["Authorization"] = authorization
    client.headers.pop("Authorization")

    response = await client.request(method, path, json=body, headers=headers)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["detail"]["field"] == "Authorization"
    assert message in response.json()["detail"]["message"]
    assert publisher.events == []


async def test_router_is_in_the_openapi_document_with_its_security_scheme(client):
    document = (await client.get("/openapi.json")).json()

    paths = {path for path in document["paths"] if path.startswith("/admin/v1/")}
    assert paths == {
        "/admin/v1/tenants",
        "/admin/v1/tenants/{tenant_id}/keys",
        "/admin/v1/keys/{key_id}",
        "/admin/v1/keys/{key_id}/budget",  # budgets per API key (issue 16)
        "/admin/v1/tenants/{tenant_id}/grants",
        "/admin/v1/grants/{grant_id}/void",
        "/admin/v1/tenants/{tenant_id}/balance",
        "/admin/v1/tenants/{tenant_id}/entries",
        "/admin/v1/tenants/{tenant_id}/policy",
        "/admin/v1/tenants/{tenant_id}/statements",  # finance (issue 14)
        "/admin/v1/tenants/{tenant_id}/overage-rate",
        "/admin/v1/periods/close",
        "/admin/v1/models/{alias}/route",
        "/admin/v1/models/{alias}/promote",
        "/admin/v1/models/{alias}/rollback",
        "/admin/v1/models/{alias}/evals",
        "/admin/v1/prompts/{name}/versions/{version}",
        "/admin/v1/audit/public-key",  # the audit routes (issue 15)
        "/admin/v1/audit/log",
        "/admin/v1/tenants/{tenant_id}/entries/{entry_id}/proof",
        "/admin/v1/credentials",
        "/admin/v1/credentials/{name}/revoke",
        "/admin/v1/tenants/{tenant_id}/portal-links",  # tenant portal links (issue 17)
        "/admin/v1/tenants/{tenant_id}/alert-rules",  # alert and auto top-up rules (issue 16)
        "/admin/v1/tenants/{tenant_id}/alert-rules/{rule_id}",
        "/admin/v1/tenants/{tenant_id}/top-up-rules",
        "/admin/v1/tenants/{tenant_id}/top-up-rules/{rule_id}",
        "/admin/v1/tenants/{tenant_id}/webhooks",  # webhook endpoints and their delivery logs (issue 16)
        "/admin/v1/webhooks/{endpoint_id}",
        "/admin/v1/webhooks/{endpoint_id}/rotate-secret",
        "/admin/v1/webhooks/{endpoint_id}/deliveries",
    }
    assert document["components"]["securitySchemes"]["AdminToken"]["scheme"] == "bearer"
