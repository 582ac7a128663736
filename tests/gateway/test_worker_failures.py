"""The gateway over a scripted worker (tests/gateway/servers.FakeWorker) and real Postgres: what a real
worker cannot be made to do on demand. A worker that dies mid-stream (the gateway bills what it relayed),
error lines (never retried), 5xx (retried under a new attempt id), a slow worker whose non-streaming client
leaves (cancelled, billed what was produced), the internal token on every call, Idempotency-Key on streams,
and OpenAI's error shape on unknown routes."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from inference.settings import WorkerSettings
from inference.tokenizer import count_tokens
from ledger.pricing import usage_amount
from tests.gateway.conftest import (
    RecordingAdmission,
    gateway_settings,
    insert_tenant_with_key,
    start_fake_worker,
    start_gateway,
)
from tests.gateway.servers import FakeStream

pytestmark = pytest.mark.postgres

MODEL = "tollgate-tiny"
PRICE = WorkerSettings().models[MODEL].price
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def tenant(module_database_url):
    return insert_tenant_with_key(module_database_url, "failures")


@pytest.fixture
def gateway_over(module_database_url, tenant):
    """gateway_over(*workers) -> a running gateway whose workers are those fakes; stopped after the test."""
    running = []

    def start(*workers, **overrides):
        gateway = start_gateway(
            module_database_url,
            gateway_settings([worker.url for worker in workers], **overrides),
            RecordingAdmission(),
        )
        running.append(gateway)
        return gateway

    yield start
    for gateway in running:
        gateway.server.stop()


@pytest.fixture
def fakes():
    """fakes(n, plan) -> n scripted workers sharing one plan; stopped after the test."""
    running = []

    def start(count: int, plan):
        workers = [start_fake_worker(plan) for _ in range(count)]
        running.extend(workers)
        return workers

    yield start
    for worker in running:
        worker.server.stop()


def client_of(gateway, tenant) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=gateway.url, headers={"Authorization": f"Bearer {tenant.key}"}, timeout=30
    )


def wait_settled(admission: RecordingAdmission, request_id: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not admission.settled(request_id) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert admission.settled(request_id), f"{request_id} was never settled"


@pytest.mark.parametrize("stream", [True, False])
async def test_a_worker_dying_mid_stream_is_billed_by_the_gateway_for_what_was_relayed(
    fakes, gateway_over, tenant, stream
):
    [worker] = fakes(1, lambda _body: FakeStream(tokens=3, ending="die"))
    gateway = gateway_over(worker)
    before_ms = time.time_ns() // 1_000_000
    async with client_of(gateway, tenant) as http:
        response = await http.post(
            "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 50, "stream": stream}
        )
    request_id = response.headers.get("x-request-id") or gateway.admission.admitted[-1].request_id
    if stream:
        assert response.status_code == 200 and "worker_failed" in response.text
    else:
        assert response.status_code == 502 and response.json()["error"]["type"] == "server_error"
    [call] = worker.fake.calls
    assert call.body["request_id"] == request_id, "the first attempt's id is the request id"
    usage = gateway.log.usage_of(request_id)
    prompt_tokens = count_tokens(PROMPT)
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, 3)
    assert usage.amount == usage_amount(PRICE, prompt_tokens, 3)
    assert usage.occurred_at == call.body["admitted_at_ms"], "billed at the admission time"
    assert before_ms <= usage.occurred_at <= time.time_ns() // 1_000_000
    assert (usage.tenant_id, usage.model) == (tenant.tenant_id, MODEL)
    wait_settled(gateway.admission, request_id)
    assert (request_id, usage.amount) in gateway.admission.finished


async def test_a_finished_stream_publishes_nothing_from_the_gateway(fakes, gateway_over, tenant):
    [worker] = fakes(1, lambda _body: FakeStream(tokens=3))
    gateway = gateway_over(worker)
    async with client_of(gateway, tenant) as http:
        response = await http.post(
            "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 5}
        )
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == " t0 t1 t2"
    assert worker.fake.calls[0].authorization == f"Bearer {worker.fake.internal_token}"
    assert gateway.log.published == [], "the worker bills a stream that ended with its done line"


async def test_usage_the_worker_could_not_record_is_published_by_the_gateway(fakes, gateway_over, tenant):
    [worker] = fakes(1, lambda _body: FakeStream(tokens=2, ending="error", error="usage_not_recorded"))
    gateway = gateway_over(worker)
    async with client_of(gateway, tenant) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 5,
                "stream": True,
            },
        )
    assert response.status_code == 200
    usage = gateway.log.usage_of(response.headers["x-request-id"])
    assert usage.completion_tokens == 2


@pytest.mark.parametrize(("error", "status"), [("request_failed", 500), ("engine_failed", 502)])
async def test_a_request_that_failed_on_its_worker_is_not_retried_on_another(
    fakes, gateway_over, tenant, error, status
):
    workers = fakes(2, lambda _body: FakeStream(tokens=0, ending="error", error=error))
    gateway = gateway_over(*workers)
    async with client_of(gateway, tenant) as http:
        response = await http.post(
            "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 5}
        )
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == "server_error"
    assert sum(len(worker.fake.calls) for worker in workers) == 1, "one worker saw it, the other never did"
    [admitted] = gateway.admission.admitted
    wait_settled(gateway.admission, admitted.request_id)


async def test_a_retry_after_a_5xx_uses_a_new_attempt_id(fakes, gateway_over, tenant):
    answered: list[str] = []

    def first_fails(body: dict) -> FakeStream:
        answered.append(body["request_id"])
        return FakeStream(status=500, error="internal") if len(answered) == 1 else FakeStream(tokens=2)

    workers = fakes(2, first_fails)
    gateway = gateway_over(*workers)
    async with client_of(gateway, tenant) as http:
        response = await http.post(
            "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 5}
        )
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    assert answered == [request_id, f"{request_id}.2"]


async def test_a_gateway_with_the_wrong_internal_token_is_refused_by_the_worker(
    fakes, module_database_url, tenant
):
    [worker] = fakes(1, lambda _body: FakeStream())
    gateway = start_gateway(
        module_database_url, gateway_settings([worker.url]), RecordingAdmission(), internal_token="x" * 40
    )
    try:
        async with client_of(gateway, tenant) as http:
            response = await http.post(
                "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 5}
            )
    finally:
        gateway.server.stop()
    assert response.status_code == 503 and response.json()["error"]["code"] == "worker_unavailable"
    assert worker.fake.calls == [] and worker.fake.unauthorized >= 1


async def test_a_non_streaming_client_that_leaves_cancels_and_pays_for_what_was_produced(
    fakes, gateway_over, tenant
):
    max_tokens = 200
    [worker] = fakes(1, lambda _body: FakeStream(tokens=max_tokens, token_interval_s=0.02))
    gateway = gateway_over(worker)
    async with client_of(gateway, tenant) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens},
                timeout=0.6,
            )
    [admitted] = gateway.admission.admitted
    request_id = admitted.request_id
    wait_settled(gateway.admission, request_id)
    deadline = time.monotonic() + 5
    while request_id not in worker.fake.client_left and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert request_id in worker.fake.client_left, "the worker saw the gateway drop the generation"
    produced = worker.fake.tokens_sent[request_id]
    assert 1 <= produced < max_tokens / 2
    [(_, cost)] = [entry for entry in gateway.admission.finished if entry[0] == request_id]
    prompt_tokens = count_tokens(PROMPT)
    assert (
        usage_amount(PRICE, prompt_tokens, produced - 2)
        <= cost
        <= usage_amount(PRICE, prompt_tokens, produced)
    )
    assert cost < admitted.estimated_cost


async def test_idempotency_key_on_a_stream_replays_the_stream_and_runs_once(fakes, gateway_over, tenant):
    [worker] = fakes(1, lambda _body: FakeStream(tokens=4, token_interval_s=0.05))
    gateway = gateway_over(worker)
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Idempotency-Key": "stream-once-1"}
    async with client_of(gateway, tenant) as http:
        async with http.stream("POST", "/v1/completions", json=body, headers=headers) as first:
            raw = first.aiter_raw()
            parts = [await anext(raw)]  # the first token is out: the stream is running
            while_running = await http.post("/v1/completions", json=body, headers=headers)
            parts.extend([part async for part in raw])
        first_body = b"".join(parts)
        deadline = time.monotonic() + 5
        second = await http.post("/v1/completions", json=body, headers=headers)
        while (
            second.status_code == 409 and time.monotonic() < deadline
        ):  # the first stream's end is being stored
            await asyncio.sleep(0.05)
            second = await http.post("/v1/completions", json=body, headers=headers)
        third = await http.post("/v1/completions", json=body, headers=headers)
    assert while_running.status_code == 409 and while_running.json()["error"]["param"] == "Idempotency-Key"
    assert first.status_code == 200 and first_body.endswith(b"data: [DONE]\n\n")
    for repeat in (second, third):
        assert repeat.status_code == 200 and repeat.content == first_body
        assert repeat.headers["content-type"].startswith("text/event-stream")
        assert repeat.headers["idempotent-replayed"] == "true"
        assert repeat.headers["x-request-id"] == first.headers["x-request-id"]
    assert len(worker.fake.calls) == 1 and len(gateway.admission.admitted) == 1


async def test_unknown_routes_and_wrong_methods_answer_in_openai_shape(fakes, gateway_over, tenant):
    [worker] = fakes(1, lambda _body: FakeStream())
    gateway = gateway_over(worker)
    async with client_of(gateway, tenant) as http:
        unknown = await http.get("/v1/foo")
        wrong_method = await http.delete("/v1/models")
        wrong_completion_method = await http.get("/v1/chat/completions")
        document = (await http.get("/openapi.json")).json()
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"].startswith("Unknown request URL: GET /v1/foo")
    assert (
        unknown.json()["error"]["code"] == "unknown_url"
        and unknown.json()["error"]["type"] == "invalid_request_error"
    )
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "GET"
    assert set(wrong_method.json()["error"]) == {"message", "type", "param", "code"}
    assert wrong_completion_method.status_code == 405 and wrong_completion_method.headers["allow"] == "POST"
    for path, body_schema in (
        ("/v1/chat/completions", "ChatCompletionBody"),
        ("/v1/completions", "CompletionBody"),
    ):
        operation = document["paths"][path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(body_schema)
        assert set(operation["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
        assert {"400", "401", "429", "503"} <= set(operation["responses"])
    schemas = document["components"]["schemas"]
    assert "messages" in schemas["ChatCompletionBody"]["properties"] and "OpenAIErrorResponse" in schemas
