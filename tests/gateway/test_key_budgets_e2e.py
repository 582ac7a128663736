"""Budgets per API key and the three balances end to end (issue 16, points 1 and 4): the gateway, a real
inference worker, Kafka, the faust processor, the projector and Postgres (tests/fixtures/stack.py). The
usage of a request made with a key carries the key's id into its ledger entry; the key's budget counts
that entry; the tenant reads its settled, live and pending balances and its credit grants."""

from __future__ import annotations

import time
import uuid

import httpx
import openai
import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

GRANT = 1_000_000
PENDING = 5_000
BUDGET_APPLIES_WITHIN_S = 30  # the gateway's key cache ttl (5 s) and the key's spend cache (1 s), with room
MESSAGES = [{"role": "user", "content": "Say hi"}]


def test_a_keys_usage_is_counted_against_its_budget_from_the_ledger(stack):
    tenant = stack.new_tenant("pro", GRANT)
    created = stack.admin.post(f"/admin/v1/tenants/{tenant.tenant_id}/keys", json={"daily_credits": 10**6})
    assert created.status_code == 201 and created.json()["daily_credits"] == 10**6, created.text
    key_id, key = created.json()["key_id"], created.json()["key"]
    effective_at = int(time.time() * 1000) + 3_600_000
    pending = stack.admin.post(
        f"/admin/v1/tenants/{tenant.tenant_id}/grants",
        json={"amount": PENDING, "effective_at": effective_at},
        headers={"Idempotency-Key": f"e2e-{uuid.uuid4().hex}"},
    )
    assert pending.status_code == 201, pending.text

    client = openai.OpenAI(api_key=key, base_url=stack.gateway_url + "/v1", max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(
        model="tollgate-tiny", messages=MESSAGES, max_tokens=4
    )
    assert raw.headers["x-ratelimit-limit-credits"] == str(10**6)
    request_id = raw.headers["x-request-id"]
    entry = stack.usage_entry(tenant.tenant_id, request_id)
    assert entry["api_key_id"] == key_id  # UsageRecorded.api_key_id -> usage_allocated -> the projection
    cost = entry["amount"]
    stack.wait_balance(tenant.tenant_id, GRANT - cost)

    view = stack.admin.get(f"/admin/v1/tenants/{tenant.tenant_id}/balance").json()
    assert view["settled"] == view["balance"] == GRANT - cost
    assert view["live"] == view["settled"] - view["held"]
    assert view["pending"] == [
        {
            "grant_id": pending.json()["grant_id"],
            "amount": PENDING,
            "effective_at": effective_at,
            "expires_at": None,
        }
    ]
    summary = httpx.get(
        stack.gateway_url + "/v1/dashboard/billing/credit_grants",
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    ).json()
    assert (summary["total_granted"], summary["total_used"], summary["total_available"]) == (
        float(GRANT),
        float(cost),
        float(GRANT - cost),
    )

    # The budget is lowered to what the key has spent: its ledger entry alone now refuses the next request.
    lowered = stack.admin.put(f"/admin/v1/keys/{key_id}/budget", json={"daily_credits": cost})
    assert lowered.status_code == 200 and lowered.json()["monthly_credits"] is None, lowered.text
    deadline = time.monotonic() + BUDGET_APPLIES_WITHIN_S
    while True:
        try:
            client.chat.completions.create(model="tollgate-tiny", messages=MESSAGES, max_tokens=4)
        except openai.RateLimitError as refusal:
            assert refusal.param == "daily_credits" and key_id in refusal.message
            assert refusal.response.headers["x-ratelimit-remaining-credits"] == "0"
            break
        assert time.monotonic() < deadline, "the lowered budget was never applied"
        time.sleep(0.5)
    # Another key of the same tenant, without a budget, is not limited by it.
    other = openai.OpenAI(api_key=tenant.key, base_url=stack.gateway_url + "/v1", max_retries=0, timeout=60)
    assert other.chat.completions.create(model="tollgate-tiny", messages=MESSAGES, max_tokens=4).choices
