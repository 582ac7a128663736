"""Input at the edges of what Postgres and the ledger hold: every admin route answers a 4xx naming the
field (never a 500), a tenant's credit stays inside a bigint, and racing retries publish once."""

import asyncio
import re
from typing import get_args
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from gateway.admin import AdminSettings
from ledger.events import AMOUNT_MAX, TENANT_CREDIT_MAX
from tests.admin.conftest import ADMIN_TOKEN
from tests.fixtures.admin_api import admin_api, admin_client

pytestmark = pytest.mark.postgres

NUL = "\x00"
ARABIC_INDIC_33 = "\u0663\u0663"  # "٣٣": Python's int() reads it as 33
FULLWIDTH_2024 = "\uff12\uff10\uff12\uff14"  # "２０２４"

# A valid body for every route that takes one; the walk puts a NUL into each of its string fields.
VALID_BODIES = {
    ("POST", "/admin/v1/tenants"): {"name": "Acme", "tier": "pro"},
    ("POST", "/admin/v1/tenants/{tenant_id}/keys"): {"daily_credits": 100, "monthly_credits": 1000},
    ("PUT", "/admin/v1/keys/{key_id}/budget"): {"daily_credits": 100, "monthly_credits": 1000},
    ("PUT", "/admin/v1/tenants/{tenant_id}/policy"): {"retention_days": 30, "safety": {"pii": ["email"]}},
    ("PUT", "/admin/v1/models/{alias}/route"): {
        "stable_model": "tollgate-tiny",
        "canary_model": "tollgate-tiny",
        "canary_percent": 10,
    },
    ("POST", "/admin/v1/models/{alias}/rollback"): {"reason": "manual"},
    ("PUT", "/admin/v1/prompts/{name}/versions/{version}"): {"text": "You are terse."},
    ("POST", "/admin/v1/credentials"): {"name": "walker", "role": "finance"},
    ("PUT", "/admin/v1/tenants/{tenant_id}/overage-rate"): {
        "rate_per_million_credits": 20,
        "currency": "USD",
    },
    ("POST", "/admin/v1/periods/close"): {"until": "2026-11-01T00:00:00Z"},
    ("POST", "/admin/v1/tenants/{tenant_id}/webhooks"): {
        "url": "https://hooks.example/tollgate",
        "description": "ops",
        "alert_kinds": ["depleted"],
    },
    ("POST", "/admin/v1/webhooks/{endpoint_id}/rotate-secret"): {"overlap_ms": 60_000},
    ("PUT", "/admin/v1/tenants/{tenant_id}/alert-rules/{rule_id}"): {
        "kind": "balance_below",
        "threshold": 10,
        "window_ms": None,
    },
    ("PUT", "/admin/v1/tenants/{tenant_id}/top-up-rules/{rule_id}"): {
        "threshold": 10,
        "amount": 5,
        "target": None,
        "category": "paid",
        "price": 100,
        "currency": "USD",
        "monthly_count_max": 1,
        "monthly_price_max": None,
    },
    ("POST", "/admin/v1/tenants/{tenant_id}/grants"): {
        "amount": 5,
        "effective_at": "1700000000000",
        "expires_at": "2030-01-01T00:00:00Z",
        "priority": 0,
        "category": "paid",
        "price": 500,
        "currency": "USD",
        "reference": "inv-1",
        "models": ["gpt-x"],
    },
}
VALID_HEADERS = {"Idempotency-Key": "walk-1"}
# Valid values of the query parameters a route needs together (the walk puts a NUL into one at a time).
VALID_QUERIES = {
    ("GET", "/admin/v1/tenants/{tenant_id}/statements"): {
        "from": "2026-11-01T00:00:00Z",
        "to": "2026-12-01T00:00:00Z",
    },
}


def flat_routes(routes: list) -> list:
    """Every route, inside included routers too (FastAPI wraps each in an `original_router`)."""
    flat = []
    for route in routes:
        included = getattr(route, "original_router", None)
        flat.extend(flat_routes(included.routes) if included is not None else [route])
    return flat


def admin_routes(app: FastAPI) -> list[APIRoute]:
    flat = flat_routes(app.routes)
    routes = [r for r in flat if isinstance(r, APIRoute) and r.path.startswith("/admin/v1/")]
    assert len(routes) >= 7, [r.path for r in routes]
    return routes


async def existing_ids(client, tenant_id) -> dict[str, str]:
    key = await client.post(f"/admin/v1/tenants/{tenant_id}/keys")
    grant = await client.post(
        f"/admin/v1/tenants/{tenant_id}/grants", json={"amount": 5}, headers={"Idempotency-Key": "ids"}
    )
    assert key.status_code == 201 and grant.status_code == 201
    return {
        "tenant_id": tenant_id,
        "key_id": key.json()["key_id"],
        "grant_id": grant.json()["grant_id"],
        "alias": "tollgate-tiny",
        "name": "support",
        "version": "1",
        "entry_id": f"{tenant_id}/usage/walk",  # holds slashes: the proof route's {entry_id:rest}
        "endpoint_id": "we_walk",
        "rule_id": "low",
    }


def requests_with_a_nul(route: APIRoute, ids: dict[str, str]):
    """(input name, method, url, headers, body) with a NUL in that one input, the others valid."""
    method = sorted(route.methods)[0]
    body = VALID_BODIES.get((method, route.path))
    if route.body_field is not None:
        assert body is not None, f"add a valid body for {method} {route.path} to VALID_BODIES"
        annotation = route.body_field.field_info.annotation  # a model, or a model | None (optional body)
        (model,) = [a for a in (get_args(annotation) or (annotation,)) if hasattr(a, "model_fields")]
        assert set(body) == set(model.model_fields), f"VALID_BODIES of {route.path} is stale"
    path_names = [param.name for param in route.dependant.path_params]
    header_names = [param.alias for param in route.dependant.header_params]
    headers = {name.title(): VALID_HEADERS[name.title()] for name in header_names}

    def url(with_nul: str | None = None) -> str:
        values = {name: ids[name] + (NUL if name == with_nul else "") for name in path_names}
        path = re.sub(r":\w+}", "}", route.path)  # a converter's name is not part of the URL
        return path.format(**{name: quote(value, safe="") for name, value in values.items()})

    for name in path_names:
        yield name, method, url(name), headers, body
    valid_query = VALID_QUERIES.get((method, route.path), {})
    for param in route.dependant.query_params:
        query = {**valid_query, param.alias: valid_query.get(param.alias, "1") + NUL}
        query_string = "&".join(f"{name}={quote(value)}" for name, value in query.items())
        yield param.alias, method, f"{url()}?{query_string}", headers, body
    for name in header_names:
        yield name.title(), method, url(), {**headers, name.title(): "walk" + NUL}, body
    for field, value in (body or {}).items():
        if isinstance(value, str):
            yield field, method, url(), headers, {**body, field: value + NUL}


async def test_a_nul_byte_in_any_string_input_of_any_route_is_a_4xx_naming_it(admin_app, client, tenant_id):
    ids = await existing_ids(client, tenant_id)
    walked = []
    for route in admin_routes(admin_app):
        for name, method, url, headers, body in requests_with_a_nul(route, ids):
            try:
                response = await client.request(method, url, headers=headers, json=body)
            except httpx.LocalProtocolError:  # a client refusing to send a NUL in a header is fine too
                assert name in VALID_HEADERS
                continue
            walked.append((method, route.path, name))
            assert 400 <= response.status_code < 500, (method, url, name, response.status_code, response.text)
            assert response.json()["detail"]["field"] == name, (method, url, response.text)
    walked_routes = {(method, path) for method, path, _ in walked}
    with_inputs = {  # a route without any input (the audit public key, the credential list) has none to walk
        (sorted(route.methods)[0], route.path)
        for route in admin_routes(admin_app)
        if next(requests_with_a_nul(route, ids), None) is not None
    }
    assert walked_routes == with_inputs, with_inputs - walked_routes
    assert {"tenant_id", "key_id", "grant_id", "name", "tier", "at", "since", "effective_at"} <= {
        name for *_, name in walked
    }


@pytest.mark.parametrize(
    "method, path, kwargs, field",
    [
        ("POST", "/admin/v1/tenants", {"json": {"name": "A\x00b", "tier": "pro"}}, "name"),
        ("POST", "/admin/v1/tenants/{tenant_id}\x00/keys", {}, "tenant_id"),
        ("DELETE", "/admin/v1/keys/key_1\x00", {}, "key_id"),
        ("POST", "/admin/v1/grants/gr_1\x00/void", {}, "grant_id"),
        ("GET", "/admin/v1/tenants/{tenant_id}\x00/balance", {}, "tenant_id"),
        ("GET", "/admin/v1/tenants/{tenant_id}\x00/entries", {}, "tenant_id"),
        # a line break in the rest-of-path entry id still reaches the route (not the unknown-URL 404)
        ("GET", "/admin/v1/tenants/{tenant_id}/entries/a/usage/\n\x019/proof", {}, "entry_id"),
        (
            "POST",
            "/admin/v1/tenants/{tenant_id}\x00/grants",
            {"json": {"amount": 1}, "headers": {"Idempotency-Key": "k"}},
            "tenant_id",
        ),
    ],
)
async def test_nul_in_each_route_is_a_4xx_naming_the_field(client, tenant_id, method, path, kwargs, field):
    url = quote(path.format(tenant_id=tenant_id), safe="/")
    response = await client.request(method, url, **kwargs)

    assert response.status_code == 422, response.text
    assert response.json()["detail"]["field"] == field
    assert response.json()["detail"]["message"].startswith(f"{field}: ")


async def test_entries_since_beyond_bigint_is_a_422_naming_since(client, tenant_id):
    too_far = await client.get(f"/admin/v1/tenants/{tenant_id}/entries", params={"since": 2**63})
    last = await client.get(f"/admin/v1/tenants/{tenant_id}/entries", params={"since": 2**63 - 1})

    assert too_far.status_code == 422 and too_far.json()["detail"]["field"] == "since"
    assert last.status_code == 200 and last.json()["entries"] == []


@pytest.mark.parametrize(
    "value",
    [ARABIC_INDIC_33, f"{FULLWIDTH_2024}-01-01T00:00:00Z", f"2024-01-01T00:00:00{ARABIC_INDIC_33[0]}Z"],
)
async def test_times_in_other_scripts_digits_are_refused(client, tenant_id, publisher, value):
    grant = await client.post(
        f"/admin/v1/tenants/{tenant_id}/grants",
        json={"amount": 1, "effective_at": value},
        headers={"Idempotency-Key": "digits"},
    )
    balance = await client.get(f"/admin/v1/tenants/{tenant_id}/balance", params={"at": value})

    assert grant.status_code == 422 and grant.json()["detail"]["field"] == "effective_at", grant.text
    assert balance.status_code == 422 and balance.json()["detail"]["field"] == "at", balance.text
    assert publisher.events == []


@pytest.fixture
async def unbounded_client(session_factory, publisher, clock):
    """The admin API with grant_amount_max at the largest single grant the ledger takes."""
    settings = AdminSettings(grant_amount_max=AMOUNT_MAX)
    app = admin_api(session_factory, publisher, ADMIN_TOKEN, settings=settings, clock=clock)
    async with admin_client(app, ADMIN_TOKEN) as client:
        yield client


async def test_a_grant_above_the_tenant_credit_max_is_refused_naming_amount(
    unbounded_client, tenant_id, publisher
):
    async def grant(amount, key):
        return await unbounded_client.post(
            f"/admin/v1/tenants/{tenant_id}/grants", json={"amount": amount}, headers={"Idempotency-Key": key}
        )

    first = await grant(TENANT_CREDIT_MAX // 2, "one")
    second = await grant(TENANT_CREDIT_MAX // 2, "two")
    over = await grant(1, "three")
    retry = await grant(TENANT_CREDIT_MAX // 2, "one")

    assert (first.status_code, second.status_code, retry.status_code) == (201, 201, 201)
    assert over.status_code == 422, over.text
    assert over.json()["detail"]["field"] == "amount"
    assert [event.grant_id for event in publisher.events] == [
        first.json()["grant_id"],
        second.json()["grant_id"],
    ]


async def test_twenty_concurrent_retries_of_one_grant_publish_one_event(client, tenant_id, publisher):
    publisher.delay_s = 0.02  # a broker round trip: long enough for the retries to overlap

    responses = await asyncio.gather(
        *(
            client.post(
                f"/admin/v1/tenants/{tenant_id}/grants",
                json={"amount": 7},
                headers={"Idempotency-Key": "race"},
            )
            for _ in range(20)
        )
    )

    assert {response.status_code for response in responses} == {201}
    assert len({response.json()["grant_id"] for response in responses}) == 1
    assert len(publisher.events) == 1
    assert sum("Idempotent-Replayed" not in response.headers for response in responses) == 1


async def test_twenty_concurrent_voids_of_one_grant_publish_one_event(client, tenant_id, publisher):
    granted = await client.post(
        f"/admin/v1/tenants/{tenant_id}/grants", json={"amount": 7}, headers={"Idempotency-Key": "g"}
    )
    publisher.delay_s = 0.02

    responses = await asyncio.gather(
        *(client.post(f"/admin/v1/grants/{granted.json()['grant_id']}/void") for _ in range(20))
    )

    assert {response.status_code for response in responses} == {200}
    assert [type(event).__name__ for event in publisher.events] == ["CreditGranted", "GrantVoided"]
