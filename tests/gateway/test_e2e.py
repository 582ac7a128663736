"""End to end through the official `openai` client: the gateway process with the real admission, a real
inference worker, Kafka, the faust processor, the projector and Postgres (tests/fixtures/stack.py).

Every test checks the bill where it lands: the fold's usage entry for the request (exact token counts and
cost at the model's price) and the tenant's balance, which falls by exactly that cost.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from inference.settings import WorkerSettings
from ledger.pricing import usage_amount
from tests.fixtures.stack import FREE_REQUESTS_PER_MINUTE

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

MODEL = "tollgate-tiny"
PRICE = WorkerSettings().models[MODEL].price


def client_of(stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=stack.gateway_url + "/v1", max_retries=0, timeout=60)


def assert_billed(
    stack, tenant_id: str, request_id: str, prompt_tokens: int, completion_tokens: int, before: int
) -> int:
    entry = stack.usage_entry(tenant_id, request_id)
    cost = usage_amount(PRICE, prompt_tokens, completion_tokens)
    assert (entry["prompt_tokens"], entry["completion_tokens"], entry["amount"]) == (
        prompt_tokens,
        completion_tokens,
        cost,
    )
    assert entry["model"] == MODEL
    stack.wait_balance(tenant_id, before - cost)
    return cost


def test_non_streaming_chat_is_billed_exactly(stack):
    tenant = stack.demo
    before = stack.balance(tenant.tenant_id)
    raw = client_of(stack, tenant.key).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello, who are you?"}],
        max_tokens=20,
        temperature=0,
    )
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]
    assert completion.id == f"chatcmpl-{request_id}"
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    assert_billed(
        stack,
        tenant.tenant_id,
        request_id,
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
        before,
    )


def test_streaming_with_include_usage_is_billed_exactly(stack):
    tenant = stack.demo
    before = stack.balance(tenant.tenant_id)
    stream = client_of(stack, tenant.key).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    request_id = chunks[0].id.removeprefix("chatcmpl-")
    assert_billed(stack, tenant.tenant_id, request_id, usage.prompt_tokens, usage.completion_tokens, before)


def test_disconnect_mid_stream_bills_the_tokens_produced(stack):
    tenant = stack.demo
    before = stack.balance(tenant.tenant_id)
    max_tokens = 250
    headers = {"Authorization": f"Bearer {tenant.key}"}
    body = {
        "model": MODEL,
        "prompt": "The",
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 1,
        "seed": 5,
    }
    with (
        httpx.Client(base_url=stack.gateway_url, headers=headers, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200, response.read()
        request_id = response.headers["x-request-id"]
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data: {")
            if received == 3:
                break
    entry = stack.usage_entry(tenant.tenant_id, request_id)
    assert 3 <= entry["completion_tokens"] < max_tokens
    assert_billed(
        stack, tenant.tenant_id, request_id, entry["prompt_tokens"], entry["completion_tokens"], before
    )


def test_idempotent_repeat_returns_the_stored_response_and_bills_once(stack):
    tenant = stack.demo
    before = stack.balance(tenant.tenant_id)
    client = client_of(stack, tenant.key)
    calls = [
        client.completions.with_raw_response.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=10,
            extra_headers={"Idempotency-Key": "e2e-repeat-1"},
        )
        for _ in range(2)
    ]
    first, second = (call.parse() for call in calls)
    assert second.model_dump() == first.model_dump()
    assert calls[1].headers["idempotent-replayed"] == "true"
    request_id = calls[0].headers["x-request-id"]
    assert_billed(
        stack, tenant.tenant_id, request_id, first.usage.prompt_tokens, first.usage.completion_tokens, before
    )
    usage_entries = [e for e in stack.entries(tenant.tenant_id) if e.get("type") == "usage_allocated"]
    assert sum(1 for e in usage_entries if e["request_id"] == request_id) == 1


def test_bad_key_is_401_and_limits_are_400(stack):
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        client_of(stack, "tg_000000000000_not-a-key").models.list()
    assert unauthorized.value.status_code == 401
    with pytest.raises(openai.BadRequestError) as too_long:
        client_of(stack, stack.demo.key).completions.create(model=MODEL, prompt="hi", max_tokens=100_000)
    assert too_long.value.status_code == 400 and too_long.value.param == "max_tokens"


def test_credit_exhausted_is_429_insufficient_quota(stack):
    poor = stack.new_tenant("pro", 50)
    with pytest.raises(openai.RateLimitError) as refused:
        client_of(stack, poor.key).completions.create(
            model=MODEL, prompt="Write a long essay", max_tokens=200
        )
    assert refused.value.status_code == 429
    assert refused.value.body["type"] == "insufficient_quota"
    assert stack.balance(poor.tenant_id) == 50


def test_requests_per_minute_is_429_rate_limit_with_retry_after(stack):
    limited = stack.new_tenant("free", 100_000)
    client = client_of(stack, limited.key)
    for _ in range(FREE_REQUESTS_PER_MINUTE):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    with pytest.raises(openai.RateLimitError) as refused:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert refused.value.body["type"] == "rate_limit_exceeded"
    assert int(refused.value.response.headers["retry-after"]) >= 1


def test_one_tenant_cannot_replay_anothers_idempotent_response(stack):
    other = stack.new_tenant("pro", 10_000)
    body = {"model": MODEL, "prompt": "Mine", "max_tokens": 4}
    headers = {"Idempotency-Key": "shared-key"}
    with httpx.Client(base_url=stack.gateway_url, timeout=60) as http:
        mine = http.post(
            "/v1/completions", json=body, headers={**headers, "Authorization": f"Bearer {stack.demo.key}"}
        )
        theirs = http.post(
            "/v1/completions", json=body, headers={**headers, "Authorization": f"Bearer {other.key}"}
        )
    assert (mine.status_code, theirs.status_code) == (200, 200)
    assert "idempotent-replayed" not in theirs.headers
    assert theirs.headers["x-request-id"] != mine.headers["x-request-id"]
    stack.usage_entry(other.tenant_id, theirs.headers["x-request-id"])


def test_logprobs_are_served_and_unsupported_parameters_refused_unbilled(stack):
    tenant = stack.demo
    before = stack.balance(tenant.tenant_id)
    client = client_of(stack, tenant.key)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        )
    assert refused.value.param == "tools"
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    completion = raw.parse()
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens
    assert all(len(item.top_logprobs) == 2 for item in content)
    request_id = raw.headers["x-request-id"]
    assert_billed(
        stack,
        tenant.tenant_id,
        request_id,
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
        before,
    )
