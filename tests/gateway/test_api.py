"""The gateway over a real worker and real Postgres (admission recorded): OpenAI's wire format through the
official client, auth, limits, admission refusals, backpressure, retries, disconnects, idempotency."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import psycopg
import pytest

from gateway.admission.base import CreditExhausted, RateLimited
from inference.settings import WorkerSettings
from ledger.pricing import usage_amount
from tests.fixtures.processes import free_port
from tests.gateway.conftest import (
    RecordingAdmission,
    gateway_settings,
    insert_tenant_with_key,
    start_gateway,
)

pytestmark = pytest.mark.postgres

MODEL = "tollgate-tiny"
PRICE = WorkerSettings().models[MODEL].price


@pytest.fixture(scope="module")
def gateway(worker, module_database_url):
    running = start_gateway(module_database_url, gateway_settings([worker.url]), RecordingAdmission())
    yield running
    running.server.stop()


@pytest.fixture(scope="module")
def tenant(module_database_url):
    return insert_tenant_with_key(module_database_url, "acme")


@pytest.fixture
def client(gateway, tenant) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=tenant.key, base_url=gateway.url + "/v1", max_retries=0)


@pytest.fixture
def http(gateway, tenant):
    return httpx.AsyncClient(
        base_url=gateway.url, headers={"Authorization": f"Bearer {tenant.key}"}, timeout=30
    )


async def test_chat_completion_bills_the_workers_token_counts(client, gateway, worker):
    response = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=12, temperature=0
    )
    completion = response.parse()
    request_id = response.headers["x-request-id"]
    assert completion.object == "chat.completion"
    assert completion.id == f"chatcmpl-{request_id}"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason in ("stop", "length")
    usage = worker.usage_of(request_id)
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert 1 <= usage.completion_tokens <= 12
    assert (request_id, usage.amount) in gateway.admission.finished
    assert usage.amount == usage_amount(PRICE, usage.prompt_tokens, usage.completion_tokens)
    assert response.headers["x-ratelimit-limit-requests"] == "100"


async def test_streaming_chat_with_include_usage(client, worker):
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count"}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    finish = [
        chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason
    ]
    assert len(finish) == 1 and finish[0] in ("stop", "length")
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(chunk.usage is None for chunk in chunks[:-1])
    usage = worker.usage_of(chunks[0].id.removeprefix("chatcmpl-"))
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert last.usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_text_completion_streams_and_ends_with_done(http):
    async with http.stream(
        "POST",
        "/v1/completions",
        json={"model": MODEL, "prompt": "Once upon", "max_tokens": 5, "stream": True},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert '"object":"text_completion"' in lines[0]


async def test_models_lists_the_served_model(client):
    models = await client.models.list()
    assert [model.id for model in models.data] == [MODEL]


async def test_unknown_missing_and_revoked_keys_are_401(gateway, tenant, module_database_url):
    async with httpx.AsyncClient(base_url=gateway.url) as anonymous:
        missing = await anonymous.get("/v1/models")
        wrong = await anonymous.get("/v1/models", headers={"Authorization": "Bearer tg_000000000000_nope"})
    assert (missing.status_code, wrong.status_code) == (401, 401)
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert set(wrong.json()["error"]) == {"message", "type", "param", "code"}

    doomed = insert_tenant_with_key(module_database_url, "doomed")
    headers = {"Authorization": f"Bearer {doomed.key}"}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers) as doomed_client:
        assert (await doomed_client.get("/v1/models")).status_code == 200
        with psycopg.connect(module_database_url, autocommit=True) as connection:
            connection.execute("UPDATE api_keys SET revoked_at_ms = 1 WHERE key_id = %s", (doomed.key_id,))
        deadline = time.monotonic() + gateway.settings.auth_cache_ttl_ms / 1000 + 5
        status = 200
        while status == 200 and time.monotonic() < deadline:
            status = (await doomed_client.get("/v1/models")).status_code
            await asyncio.sleep(0.05)
    assert status == 401


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}] * 300}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "word " * 600}]}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d"]}, "stop"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, "temperature"),
        ({"messages": []}, "messages"),
    ],
)
async def test_limits_are_a_400_naming_the_param(http, body, param):
    response = await http.post("/v1/chat/completions", json={"model": MODEL, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_body_too_large_and_unknown_model(http, gateway):
    huge = "x" * (gateway.settings.body_bytes_max + 1)
    too_large = await http.post("/v1/completions", json={"model": MODEL, "prompt": huge})
    assert too_large.status_code == 400 and too_large.json()["error"]["param"] == "body"
    unknown = await http.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("rejection", "error_type", "retry"),
    [
        (CreditExhausted("credit balance exhausted"), "insufficient_quota", "false"),
        (
            RateLimited("requests per minute exceeded", headers={"Retry-After": "2"}),
            "rate_limit_exceeded",
            None,
        ),
    ],
)
async def test_admission_rejections_are_openai_429s(client, gateway, rejection, error_type, retry):
    gateway.admission.refuse_with = rejection
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.completions.create(model=MODEL, prompt="hi", max_tokens=3)
    finally:
        gateway.admission.refuse_with = None
    assert caught.value.status_code == 429
    assert caught.value.body["type"] == error_type
    assert caught.value.response.headers.get("x-should-retry") == retry
    if isinstance(rejection, RateLimited):
        assert caught.value.response.headers["retry-after"] == "2"


async def test_client_disconnect_cancels_and_bills_tokens_produced(http, gateway, worker):
    max_tokens = 250
    async with http.stream(
        "POST",
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": "The",
            "max_tokens": max_tokens,
            "stream": True,
            "temperature": 1,
            "seed": 7,
        },
    ) as response:
        assert response.status_code == 200, await response.aread()
        request_id = response.headers["x-request-id"]
        received = 0
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                received += 1
            if received == 3:
                break
    usage = worker.usage_of(request_id)
    assert 3 <= usage.completion_tokens < max_tokens
    deadline = time.monotonic() + 10
    while not gateway.admission.settled(request_id) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    [(_, cost)] = [entry for entry in gateway.admission.finished if entry[0] == request_id]
    assert cost <= usage_amount(PRICE, usage.prompt_tokens, usage.completion_tokens)
    assert cost >= usage_amount(PRICE, usage.prompt_tokens, 3)
    metrics = (await http.get("/metrics")).text
    assert 'tollgate_gateway_stream_disconnects_total{model="tollgate-tiny"}' in metrics


async def test_idempotent_repeat_returns_the_stored_response_and_runs_once(http, gateway, worker):
    body = {"model": MODEL, "prompt": "Say it once", "max_tokens": 6}
    first = await http.post("/v1/completions", json=body, headers={"Idempotency-Key": "once-1"})
    second = await http.post("/v1/completions", json=body, headers={"Idempotency-Key": "once-1"})
    other_body = await http.post(
        "/v1/completions", json={**body, "max_tokens": 7}, headers={"Idempotency-Key": "once-1"}
    )
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.content == first.content
    assert second.headers["idempotent-replayed"] == "true"
    request_id = first.headers["x-request-id"]
    assert second.headers["x-request-id"] == request_id
    assert other_body.status_code == 400 and other_body.json()["error"]["param"] == "Idempotency-Key"
    assert sum(1 for a in gateway.admission.admitted if a.request_id == request_id) == 1
    worker.usage_of(request_id)
    assert sum(1 for event in worker.usage if event.event_id == request_id) == 1


async def test_a_dead_worker_is_skipped_before_the_first_token(worker, module_database_url, tenant):
    dead = f"http://127.0.0.1:{free_port()}"
    running = start_gateway(module_database_url, gateway_settings([dead, worker.url]), RecordingAdmission())
    try:
        client = openai.AsyncOpenAI(api_key=tenant.key, base_url=running.url + "/v1", max_retries=0)
        for _ in range(4):  # the rotation starts on the dead worker at least twice
            completion = await client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
            assert completion.usage.completion_tokens >= 1
        metrics = httpx.get(running.url + "/metrics").text
        assert "tollgate_gateway_requests_total" in metrics
    finally:
        running.server.stop()


async def test_full_worker_queues_answer_503_at_once(tiny_queue_worker, module_database_url, tenant):
    running = start_gateway(
        module_database_url, gateway_settings([tiny_queue_worker.url]), RecordingAdmission()
    )
    try:
        async with httpx.AsyncClient(
            base_url=running.url, headers={"Authorization": f"Bearer {tenant.key}"}, timeout=60
        ) as http_client:
            body = {"model": MODEL, "prompt": "Long story:", "max_tokens": 250, "temperature": 1, "seed": 3}
            responses = await asyncio.gather(
                *(http_client.post("/v1/completions", json=body) for _ in range(6))
            )
        statuses = sorted(response.status_code for response in responses)
        assert 200 in statuses and 503 in statuses, statuses
        refused = next(response for response in responses if response.status_code == 503)
        assert refused.json()["error"]["code"] == "overloaded"
        assert refused.headers["retry-after"] == "1"
        assert len(running.admission.released) == statuses.count(503)
    finally:
        running.server.stop()


async def test_chat_logprobs_through_the_openai_client(client, worker):
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert item.logprob == max(top.logprob for top in item.top_logprobs), "greedy picks the most likely"
    text = b"".join(bytes(item.bytes) for item in content).decode("utf-8", "replace")
    assert text == completion.choices[0].message.content, "the tokens' bytes spell the answer"


async def test_streamed_chat_logprobs_come_with_each_token(client):
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    with_logprobs = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].logprobs is not None]
    assert len(with_logprobs) == chunks[-1].usage.completion_tokens
    assert all(len(chunk.choices[0].logprobs.content[0].top_logprobs) == 2 for chunk in with_logprobs)


async def test_completion_logprobs_in_the_legacy_shape(client):
    completion = await client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=5, temperature=0, logprobs=2
    )
    logprobs = completion.choices[0].logprobs
    tokens = completion.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == tokens
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)


async def test_logit_bias_steers_the_choice(client):
    forced = 464  # any id of the vocabulary: +100 makes it the greedy choice every step
    completion = await client.completions.create(
        model=MODEL,
        prompt="Once upon",
        max_tokens=4,
        temperature=0,
        logprobs=0,
        logit_bias={str(forced): 100},
    )
    plain = await client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=4, temperature=0, logprobs=0
    )
    assert len(set(completion.choices[0].logprobs.tokens)) == 1
    assert completion.choices[0].logprobs.tokens != plain.choices[0].logprobs.tokens


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
        ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format"),
        ("/v1/chat/completions", {"seed": 2**64}, "seed"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
        ("/v1/completions", {"suffix": "end"}, "suffix"),
        ("/v1/completions", {"logit_bias": {"not-a-token": 3}}, "logit_bias"),
    ],
)
async def test_unsupported_parameters_are_a_400_naming_them_and_nothing_runs(
    http, gateway, path, body, param
):
    base = {"model": MODEL, "max_tokens": 3}
    base.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    admitted = len(gateway.admission.admitted)
    response = await http.post(path, json={**base, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert len(gateway.admission.admitted) == admitted, "a refused request is never admitted (nor billed)"
