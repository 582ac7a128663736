"""The tenant's safety checks and the model router on /v1/chat/completions and /v1/completions, through the
official openai client with real workers: a blocked request answers in OpenAI's error shape and is never
admitted (so never billed), a redacted input is what the model is sent, a stopped output ends with
finish_reason content_filter and is billed for the tokens produced, an alias routes to its versions (the
response and the usage name the version that served, billed at its price), and fallback_models."""

from __future__ import annotations

import time
from collections import Counter

import httpx
import openai
import pytest

from gateway.router import bucket_of
from inference.settings import WorkerSettings
from ledger.pricing import usage_amount
from tests.fixtures.processes import free_port
from tests.fixtures.registry import default_entry, write_registry
from tests.gateway.conftest import (
    ADMIN_TOKEN,
    RecordingAdmission,
    gateway_settings,
    insert_tenant_with_key,
    start_gateway,
)
from tests.gateway.test_router import PRICES, set_route, start_version_worker

pytestmark = pytest.mark.postgres

MODEL = "tiny-v1"
ALIAS = "tiny-layers"
CARD = "4111 1111 1111 1111"


@pytest.fixture(scope="module")
def versions(tmp_path_factory, monkeypatch_module):
    """Workers serving tiny-v1 and tiny-v2 (one checkpoint, two prices); tiny-v3's workers never answer."""
    path = write_registry(
        tmp_path_factory.mktemp("registry"),
        [default_entry(name=name, price=price) for name, price in PRICES.items()],
    )
    monkeypatch_module.setenv("TOLLGATE_MODEL_REGISTRY_PATH", str(path))  # the admin API's settings read it
    workers = {name: start_version_worker(name) for name in ("tiny-v1", "tiny-v2")}
    yield workers
    for worker in workers.values():
        worker.server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def gateway(versions, module_database_url):
    settings = gateway_settings(
        [versions["tiny-v1"].url],
        model_worker_urls={
            "tiny-v1": [versions["tiny-v1"].url],
            "tiny-v2": [versions["tiny-v2"].url],
            "tiny-v3": [f"http://127.0.0.1:{free_port()}"],  # nobody listens there
        },
        route_cache_ttl_ms=0,
        policy_cache_ttl_ms=0,
        rollout_window_requests_min=3,
        rollout_error_rate_margin_percent=20,
    )
    running = start_gateway(module_database_url, settings, RecordingAdmission())
    yield running
    running.server.stop()


@pytest.fixture(scope="module")
def admin(gateway):
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        yield client


def tenant_client(gateway, admin, database_url: str, tenant_id: str, safety: dict | None = None):
    tenant = insert_tenant_with_key(database_url, tenant_id)
    if safety is not None:
        answer = admin.put(f"/admin/v1/tenants/{tenant_id}/policy", json={"safety": safety})
        assert answer.status_code == 200, answer.text
    return tenant, openai.AsyncOpenAI(api_key=tenant.key, base_url=gateway.url + "/v1", max_retries=0)


def decisions(gateway, stage: str, reason: str, action: str) -> float:
    wanted = f'tollgate_gateway_safety_decisions_total{{action="{action}",reason="{reason}",stage="{stage}"}}'
    for line in httpx.get(gateway.url + "/metrics").text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


async def complete(
    client: openai.AsyncOpenAI, chat: bool, stream: bool, model: str, text: str, max_tokens: int = 24, **extra
):
    """(the response id, the model named, the text, the finish reason) of one request."""
    if chat:
        create = client.chat.completions.create
        asked = dict(messages=[{"role": "user", "content": text}])
    else:
        create = client.completions.create
        asked = dict(prompt=text)
    if not stream:
        answer = await create(model=model, max_tokens=max_tokens, temperature=0, **asked, **extra)
        choice = answer.choices[0]
        return answer.id, answer.model, choice.message.content if chat else choice.text, choice.finish_reason
    chunks = [
        chunk
        async for chunk in await create(
            model=model,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            **asked,
            **extra,
        )
    ]
    pieces = [
        (chunk.choices[0].delta.content if chat else chunk.choices[0].text) or ""
        for chunk in chunks
        if chunk.choices
    ]
    finish = next(
        chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason
    )
    return chunks[0].id, chunks[0].model, "".join(pieces), finish


def settled(gateway, request_id: str, timeout_s: float = 10) -> int:
    """What the request's reservation was settled at (a stream settles just after its last chunk)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        amounts = dict(gateway.admission.finished)
        if request_id in amounts:
            return amounts[request_id]
        time.sleep(0.01)
    raise AssertionError(f"{request_id} was never settled")


def request_id_of(response_id: str) -> str:
    return response_id.split("-", 1)[1]


ROUTES = [(True, False), (True, True), (False, False), (False, True)]


@pytest.mark.parametrize(("chat", "stream"), ROUTES)
async def test_a_blocked_input_is_refused_in_openais_shape_and_never_admitted(
    gateway, admin, module_database_url, chat, stream
):
    tenant, client = tenant_client(
        gateway, admin, module_database_url, f"layers-block-{chat}-{stream}", {"pii": ["email"]}
    )
    before = decisions(gateway, "input", "email", "block")
    with pytest.raises(openai.BadRequestError) as refused:
        await complete(client, chat, stream, MODEL, "mail me at secret.person@example.com")
    assert refused.value.code == "content_policy_violation"
    assert refused.value.body["type"] == "invalid_request_error"
    assert refused.value.param == ("messages" if chat else "prompt")
    assert all(request.tenant_id != tenant.tenant_id for request in gateway.admission.admitted)
    assert decisions(gateway, "input", "email", "block") == before + 1
    # The same text passes once the policy is gone.
    admin.put(f"/admin/v1/tenants/{tenant.tenant_id}/policy", json={})
    await complete(client, chat, stream, MODEL, "mail me at secret.person@example.com")


@pytest.mark.parametrize("chat", [True, False])
async def test_a_redacted_input_is_what_the_model_is_sent_and_billed(
    gateway,
    admin,
    versions,
    module_database_url,
    chat,
):
    _tenant, client = tenant_client(
        gateway,
        admin,
        module_database_url,
        f"layers-redact-{chat}",
        {"pii": ["card"], "input_action": "redact", "output_action": "none"},
    )
    response_id, _model, _text, _finish = await complete(client, chat, False, MODEL, f"charge {CARD} today")
    spec = WorkerSettings(model_name=MODEL).model
    sent = "charge [REDACTED:card] today"
    prompt = spec.template.render([{"role": "user", "content": sent}]) if chat else sent
    usage = versions[MODEL].usage_of(request_id_of(response_id))
    assert usage.prompt_tokens == len(spec.tokenizer().encode(prompt))


@pytest.mark.parametrize(("chat", "stream"), ROUTES)
async def test_a_stopped_output_ends_with_content_filter_and_is_billed_for_the_tokens_produced(
    gateway,
    admin,
    versions,
    module_database_url,
    chat,
    stream,
):
    # Any non-space character is a finding: the first token that shows one stops the generation.
    _tenant, client = tenant_client(
        gateway,
        admin,
        module_database_url,
        f"layers-stop-{chat}-{stream}",
        {"blocked_patterns": [r"\S"], "input_action": "none", "output_action": "stop"},
    )
    before = decisions(gateway, "output", "blocked_pattern", "stop")
    response_id, model, text, finish = await complete(client, chat, stream, MODEL, "Hi")
    assert (model, text.strip(), finish) == (MODEL, "", "content_filter")
    request_id = request_id_of(response_id)
    usage = versions[MODEL].usage_of(request_id)
    assert 1 <= usage.completion_tokens < 24  # what was produced before the stop, not what was asked
    assert usage.amount == usage_amount(
        WorkerSettings(model_name=MODEL).model.price, usage.prompt_tokens, usage.completion_tokens
    )
    assert 0 < settled(gateway, request_id) <= usage.amount
    assert decisions(gateway, "output", "blocked_pattern", "stop") == before + 1


@pytest.mark.parametrize(("chat", "stream"), [(True, True), (False, False)])
async def test_a_redacted_output_never_shows_what_the_policy_finds(
    gateway, admin, module_database_url, chat, stream
):
    _tenant, client = tenant_client(
        gateway,
        admin,
        module_database_url,
        f"layers-redact-out-{chat}-{stream}",
        {"blocked_patterns": [r"\S"], "input_action": "none"},  # every non-space character
    )
    _id, _model, text, finish = await complete(client, chat, stream, MODEL, "Once upon a time")
    assert finish in ("stop", "length")
    assert "[REDACTED:blocked_pattern]" in text
    assert text.replace("[REDACTED:blocked_pattern]", "").strip() == ""
    with pytest.raises(openai.BadRequestError) as refused:  # logprobs would show the raw tokens
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, logprobs=True
        )
    assert refused.value.param == "logprobs"


@pytest.mark.parametrize(("chat", "stream"), ROUTES)
async def test_an_alias_routes_to_its_versions_and_the_usage_names_the_version_that_served(
    gateway,
    admin,
    versions,
    module_database_url,
    chat,
    stream,
):
    set_route(admin, ALIAS, "tiny-v1", "tiny-v2", 50)
    _tenant, client = tenant_client(gateway, admin, module_database_url, f"layers-route-{chat}-{stream}")
    served = Counter()
    for _ in range(12):
        response_id, model, _text, _finish = await complete(client, chat, stream, ALIAS, "Hi", max_tokens=2)
        request_id = request_id_of(response_id)
        assert model == ("tiny-v2" if bucket_of(ALIAS, request_id) < 50 else "tiny-v1")
        usage = versions[model].usage_of(request_id)
        assert usage.model == model  # the usage event names the version
        price = WorkerSettings(model_name=model).model.price
        assert usage.amount == usage_amount(price, usage.prompt_tokens, usage.completion_tokens)
        assert settled(gateway, request_id) == usage.amount
        served[model] += 1
    assert set(served) == {"tiny-v1", "tiny-v2"}, served


@pytest.mark.parametrize("chat", [True, False])
async def test_a_completion_falls_back_in_order_to_a_model_that_can_serve_it(
    gateway,
    admin,
    versions,
    module_database_url,
    chat,
):
    _tenant, client = tenant_client(gateway, admin, module_database_url, f"layers-fallback-{chat}")
    with pytest.raises(openai.InternalServerError) as failed:
        await complete(client, chat, False, "tiny-v3", "Hi")
    assert failed.value.code == "worker_unavailable"
    response_id, model, _text, _finish = await complete(
        client, chat, False, "tiny-v3", "Hi", extra_body={"fallback_models": ["tiny-v2", "tiny-v1"]}
    )
    assert model == "tiny-v2"
    assert versions["tiny-v2"].usage_of(request_id_of(response_id)).model == "tiny-v2"


async def test_a_failing_canary_on_the_completion_routes_is_rolled_back_automatically(
    gateway, admin, module_database_url
):
    set_route(admin, "tiny-layers-broken", "tiny-v1", "tiny-v3", 50)  # tiny-v3's workers do not answer
    _tenant, client = tenant_client(gateway, admin, module_database_url, "layers-rollback")
    outcomes = Counter()
    for _ in range(60):
        try:
            _id, model, _text, _finish = await complete(
                client, True, False, "tiny-layers-broken", "Hi", max_tokens=2
            )
            outcomes[model] += 1
        except openai.InternalServerError:
            outcomes["failed"] += 1
        if admin.get("/admin/v1/models/tiny-layers-broken/route").json()["state"] == "rolled_back":
            break
    route = admin.get("/admin/v1/models/tiny-layers-broken/route").json()
    assert route["state"] == "rolled_back", outcomes
    assert route["reason"].startswith("automatic: canary error rate 100.0% vs stable 0.0%")
    for _ in range(4):  # every request now goes to the stable version
        assert (await complete(client, False, True, "tiny-layers-broken", "Hi", max_tokens=2))[1] == "tiny-v1"
