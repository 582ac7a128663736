"""The model router with real workers: an alias over two versions (registry entries with their own
workers and prices), a canary share sticky per conversation, every response and usage event naming the
version that served it and billed at its price, promotion and rollback by the admin API, and the
automatic rollback of a canary whose workers fail."""

from __future__ import annotations

import os
from collections import Counter

import httpx
import openai
import pytest

from gateway.router import CANARY, STABLE, CanaryWatch, Outcome, bucket_of, p99
from gateway.settings import GatewaySettings
from inference.settings import EngineSettings, WorkerSettings
from inference.worker import create_app as create_worker_app
from ledger.pricing import usage_amount
from tests.fixtures.processes import free_port
from tests.fixtures.registry import default_entry, write_registry
from tests.gateway.conftest import (
    ADMIN_TOKEN,
    INTERNAL_TOKEN,
    RecordingAdmission,
    RunningWorker,
    gateway_settings,
    insert_tenant_with_key,
    start_gateway,
)
from tests.gateway.servers import ThreadServer

ALIAS = "tiny"
BROKEN_ALIAS = "tiny-broken"
PRICES = {
    "tiny-v1": {"prompt_token_credits": 1, "completion_token_credits": 2, "cached_prompt_token_credits": 1},
    "tiny-v2": {"prompt_token_credits": 3, "completion_token_credits": 5, "cached_prompt_token_credits": 3},
    "tiny-v3": {"prompt_token_credits": 1, "completion_token_credits": 1, "cached_prompt_token_credits": 1},
}


# ---- the canary watch, on its own ---------------------------------------------------------------------


def watch_settings(**overrides) -> GatewaySettings:
    values = dict(
        admin_token=ADMIN_TOKEN,
        rollout_window_ms=60_000,
        rollout_window_requests_min=10,
        rollout_error_rate_margin_percent=5,
        rollout_ttft_p99_margin_ms=100,
    )
    return GatewaySettings(**{**values, **overrides})


def test_p99_is_the_value_below_which_99_percent_fall():
    assert p99([float(value) for value in range(1, 101)]) == 99.0
    assert p99([5.0]) == 5.0


def test_the_watch_judges_only_with_enough_requests_of_each_version():
    watch = CanaryWatch(watch_settings())
    for index in range(9):
        watch.add(Outcome(index, STABLE, False, 10))
        watch.add(Outcome(index, CANARY, True, 10))
    assert watch.verdict(10) is None  # 9 of each: not enough to judge
    watch.add(Outcome(10, STABLE, False, 10))
    watch.add(Outcome(10, CANARY, True, 10))
    assert watch.verdict(11).startswith("canary error rate 100.0% vs stable 0.0%")


def test_the_watch_allows_the_margin_and_forgets_outside_the_window():
    watch = CanaryWatch(watch_settings(rollout_error_rate_margin_percent=10))
    for index in range(20):
        watch.add(Outcome(index, STABLE, index < 2, 10))  # 10% errors
        watch.add(Outcome(index, CANARY, index < 4, 10))  # 20%: exactly at the margin
    assert watch.verdict(100) is None
    watch.add(Outcome(200, CANARY, True, 10))
    assert watch.verdict(200) is not None
    assert watch.verdict(200 + 60_001) is None  # everything left the window


def test_the_watch_rolls_back_a_canary_slower_to_its_first_token():
    watch = CanaryWatch(watch_settings())
    for index in range(10):
        watch.add(Outcome(index, STABLE, False, 50))
        watch.add(Outcome(index, CANARY, False, 140))
    assert watch.verdict(20) is None  # 90 ms slower: within the 100 ms margin
    watch.add(Outcome(21, CANARY, False, 400))
    assert "time-to-first-token p99 400 ms vs stable 50 ms" in watch.verdict(21)


# ---- with real workers --------------------------------------------------------------------------------


def start_version_worker(model_name: str) -> RunningWorker:
    usage = []

    async def emit(event) -> None:
        usage.append(event)

    async def build():
        settings = WorkerSettings(engine=EngineSettings(device="cpu"), model_name=model_name)
        return create_worker_app(settings, emit_usage=emit, internal_token=INTERNAL_TOKEN)

    return RunningWorker(ThreadServer(build).start(), usage)


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two workers serving tiny-v1 and tiny-v2 (the same checkpoint, other prices); tiny-v3's workers are a
    port nobody listens on."""
    path = write_registry(
        tmp_path_factory.mktemp("registry"),
        [default_entry(name=name, price=price) for name, price in PRICES.items()],
    )
    previous = os.environ.get("TOLLGATE_MODEL_REGISTRY_PATH")
    os.environ["TOLLGATE_MODEL_REGISTRY_PATH"] = str(path)  # the admin API's settings read it too
    workers = {name: start_version_worker(name) for name in ("tiny-v1", "tiny-v2")}
    yield workers
    for worker in workers.values():
        worker.server.stop()
    if previous is None:
        os.environ.pop("TOLLGATE_MODEL_REGISTRY_PATH")
    else:
        os.environ["TOLLGATE_MODEL_REGISTRY_PATH"] = previous


@pytest.fixture(scope="module")
def gateway(versions, module_database_url):
    dead = f"http://127.0.0.1:{free_port()}"
    settings = gateway_settings(
        [versions["tiny-v1"].url],
        model_worker_urls={
            "tiny-v1": [versions["tiny-v1"].url],
            "tiny-v2": [versions["tiny-v2"].url],
            "tiny-v3": [dead],
        },
        route_cache_ttl_ms=0,
        rollout_window_requests_min=3,
        rollout_error_rate_margin_percent=20,
    )
    running = start_gateway(module_database_url, settings, RecordingAdmission())
    yield running
    running.server.stop()


@pytest.fixture(scope="module")
def tenant(module_database_url):
    return insert_tenant_with_key(module_database_url, "router-acme")


@pytest.fixture
def client(gateway, tenant):
    return openai.AsyncOpenAI(api_key=tenant.key, base_url=gateway.url + "/v1", max_retries=0)


@pytest.fixture(scope="module")
def admin(gateway):
    return httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)


def set_route(admin, alias: str, stable: str, canary: str | None = None, percent: int = 0) -> dict:
    answer = admin.put(
        f"/admin/v1/models/{alias}/route",
        json={"stable_model": stable, "canary_model": canary, "canary_percent": percent},
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def check_billed_by_the_version_that_served(response, versions, gateway) -> None:
    request_id = response.id.removeprefix("resp_")
    usage = versions[response.model].usage_of(request_id)
    assert usage.model == response.model  # the usage event names the version
    price = WorkerSettings(model_name=response.model).model.price
    assert usage.amount == usage_amount(price, usage.prompt_tokens, usage.completion_tokens)
    assert (request_id, usage.amount) in gateway.admission.finished


@pytest.mark.postgres
async def test_a_canary_takes_its_share_sticky_per_conversation_and_each_version_bills_its_price(
    client, admin, versions, gateway
):
    assert set_route(admin, ALIAS, "tiny-v1", "tiny-v2", 50)["state"] == "canary"
    served = Counter()
    for _ in range(16):
        response = await client.responses.create(model=ALIAS, input="Hi", max_output_tokens=2, store=False)
        served[response.model] += 1
        check_billed_by_the_version_that_served(response, versions, gateway)
    assert set(served) == {"tiny-v1", "tiny-v2"}, served

    for _ in range(3):
        conversation = await client.conversations.create()
        expected = "tiny-v2" if bucket_of(ALIAS, conversation.id) < 50 else "tiny-v1"
        for turn in range(3):
            response = await client.responses.create(
                model=ALIAS, conversation=conversation.id, input=f"turn {turn}", max_output_tokens=2
            )
            assert response.model == expected
    first = await client.responses.create(model=ALIAS, input="Start", max_output_tokens=2)
    follow = first
    for _ in range(3):
        follow = await client.responses.create(
            model=ALIAS, previous_response_id=follow.id, input="Go on", max_output_tokens=2
        )
        assert follow.model == first.model  # a continuation stays on the version that began it


@pytest.mark.postgres
async def test_promotion_and_manual_rollback_by_the_admin_api(client, admin, versions, gateway):
    set_route(admin, ALIAS, "tiny-v1", "tiny-v2", 30)
    promoted = admin.post(f"/admin/v1/models/{ALIAS}/promote")
    assert promoted.json() | {} == {
        "alias": ALIAS,
        "stable_model": "tiny-v2",
        "canary_model": None,
        "canary_percent": 0,
        "state": "stable",
        "reason": "promoted",
    }
    for _ in range(4):
        response = await client.responses.create(model=ALIAS, input="Hi", max_output_tokens=2, store=False)
        assert response.model == "tiny-v2"
        check_billed_by_the_version_that_served(response, versions, gateway)

    set_route(admin, ALIAS, "tiny-v1", "tiny-v2", 100)
    assert (await client.responses.create(model=ALIAS, input="Hi", max_output_tokens=2)).model == "tiny-v2"
    rolled = admin.post(f"/admin/v1/models/{ALIAS}/rollback", json={"reason": "bad answers"}).json()
    assert (rolled["state"], rolled["canary_percent"], rolled["reason"]) == (
        "rolled_back",
        0,
        "manual: bad answers",
    )
    for _ in range(4):
        assert (
            await client.responses.create(model=ALIAS, input="Hi", max_output_tokens=2)
        ).model == "tiny-v1"
    assert admin.post("/admin/v1/models/unknown-alias/promote").status_code == 404
    refused = admin.put(f"/admin/v1/models/{ALIAS}/route", json={"stable_model": "not-registered"})
    assert refused.status_code == 422


@pytest.mark.postgres
async def test_a_failing_canary_is_rolled_back_automatically(client, admin, gateway):
    set_route(admin, BROKEN_ALIAS, "tiny-v1", "tiny-v3", 50)  # tiny-v3's workers do not answer
    outcomes = Counter()
    for _ in range(40):
        try:
            response = await client.responses.create(
                model=BROKEN_ALIAS, input="Hi", max_output_tokens=2, store=False
            )
            outcomes[response.model] += 1
        except openai.InternalServerError as error:
            assert error.status_code == 503
            outcomes["failed"] += 1
        if admin.get(f"/admin/v1/models/{BROKEN_ALIAS}/route").json()["state"] == "rolled_back":
            break
    route = admin.get(f"/admin/v1/models/{BROKEN_ALIAS}/route").json()
    assert route["state"] == "rolled_back", outcomes
    assert route["reason"].startswith("automatic: canary error rate 100.0% vs stable 0.0%")
    assert outcomes["failed"] >= 3 and outcomes["tiny-v1"] >= 3
    for _ in range(5):  # every request now goes to the stable version
        response = await client.responses.create(
            model=BROKEN_ALIAS, input="Hi", max_output_tokens=2, store=False
        )
        assert response.model == "tiny-v1"
    metrics = httpx.get(gateway.url + "/metrics").text
    assert f'tollgate_gateway_rollbacks_total{{alias="{BROKEN_ALIAS}",trigger="automatic"}} 1.0' in metrics


@pytest.mark.postgres
async def test_a_request_falls_back_in_order_and_is_billed_by_the_model_that_served(
    client, versions, gateway
):
    # tiny-v3's workers do not answer: without a fallback the request fails, with one it is served there.
    with pytest.raises(openai.InternalServerError) as failed:
        await client.responses.create(model="tiny-v3", input="Hi", max_output_tokens=2, store=False)
    assert failed.value.code == "worker_unavailable"
    response = await client.responses.create(
        model="tiny-v3",
        input="Hi",
        max_output_tokens=2,
        store=False,
        extra_body={"fallback_models": ["tiny-v3", "tiny-v2", "tiny-v1"]},
    )
    assert response.model == "tiny-v2"
    check_billed_by_the_version_that_served(response, versions, gateway)
    metrics = httpx.get(gateway.url + "/metrics").text
    assert (
        'tollgate_gateway_fallbacks_total{fallback="tiny-v2",model="tiny-v3",reason="worker_unavailable"}'
        in metrics
    )


@pytest.mark.postgres
async def test_a_prompt_version_builds_the_instructions_and_the_response_names_it(client, admin, versions):
    def put(version: str, text: str) -> httpx.Response:
        return admin.put(f"/admin/v1/prompts/support/versions/{version}", json={"text": text})

    assert put("1", "You are {{persona}}.").status_code == 200
    assert put("2", "You are {{persona}} and kind.").status_code == 200
    assert put("1", "You are {{persona}}.").status_code == 200  # the same text again: a no-op
    assert put("1", "Other text").status_code == 409  # a version names one text for ever
    response = await client.responses.create(
        model="tiny-v1",
        input="Hello",
        max_output_tokens=2,
        prompt={"id": "support", "version": "1", "variables": {"persona": "terse"}},
        instructions="Answer in English.",
    )
    assert (response.prompt.id, response.prompt.version) == ("support", "1")
    sent = [
        {"role": "system", "content": "You are terse.\nAnswer in English."},
        {"role": "user", "content": "Hello"},
    ]
    spec = WorkerSettings(model_name="tiny-v1").model
    expected = len(spec.tokenizer().encode(spec.template.render(sent)))
    assert (
        response.usage.input_tokens == expected == versions["tiny-v1"].usage_of(response.id[5:]).prompt_tokens
    )
    newest = await client.responses.create(
        model="tiny-v1",
        input="Hello",
        max_output_tokens=2,
        prompt={"id": "support", "variables": {"persona": "x"}},
    )
    assert newest.prompt.version == "2"
    assert (await client.responses.retrieve(newest.id)).prompt.version == "2"
    with pytest.raises(openai.BadRequestError) as missing:
        await client.responses.create(
            model="tiny-v1", input="Hello", prompt={"id": "support", "version": "1"}
        )
    assert missing.value.param == "prompt.variables"
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="tiny-v1", input="Hello", prompt={"id": "nope"})


@pytest.mark.postgres
def test_the_cli_starts_promotes_and_rolls_back_a_rollout(gateway):
    import json

    from typer.testing import CliRunner

    from tollgate.cli import app

    target = ["--url", gateway.url, "--admin-token", ADMIN_TOKEN]

    def run(*arguments: str) -> dict:
        result = CliRunner().invoke(app, ["models", *arguments, *target])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    started = run("route", "tiny-cli", "--stable", "tiny-v1", "--canary", "tiny-v2", "--percent", "20")
    assert (started["state"], started["canary_percent"]) == ("canary", 20)
    assert run("rollback", "tiny-cli", "--reason", "latency")["reason"] == "manual: latency"
    run("route", "tiny-cli", "--stable", "tiny-v1", "--canary", "tiny-v2", "--percent", "5")
    promoted = run("promote", "tiny-cli")
    assert (promoted["stable_model"], promoted["canary_model"]) == ("tiny-v2", None)
    assert run("show", "tiny-cli")["state"] == "stable"
    missing = CliRunner().invoke(app, ["models", "promote", "no-such-alias", *target])
    assert missing.exit_code == 1


@pytest.mark.postgres
def test_the_eval_gate_refuses_a_canary_scoring_below_the_stable_version_and_keeps_the_results(admin):
    set_route(admin, "tiny-gated", "tiny-v1", "tiny-v3", 10)  # tiny-v3's workers do not answer
    refused = admin.post("/admin/v1/models/tiny-gated/promote")
    assert refused.status_code == 409, refused.text
    assert refused.json()["detail"]["field"] == "eval_gate"
    assert "tiny-v3 scored 0% on the evaluation set, tiny-v1 100%" in refused.json()["detail"]["message"]
    route = admin.get("/admin/v1/models/tiny-gated/route").json()
    assert (route["stable_model"], route["canary_model"], route["state"]) == ("tiny-v1", "tiny-v3", "canary")
    results = {result["model"]: result for result in admin.get("/admin/v1/models/tiny-gated/evals").json()}
    assert (results["tiny-v1"]["score_percent"], results["tiny-v3"]["score_percent"]) == (100, 0)
    assert results["tiny-v1"]["cases"] == results["tiny-v3"]["cases"] >= 5

    set_route(admin, "tiny-gated", "tiny-v1", "tiny-v2", 10)  # the same checkpoint: the same score
    promoted = admin.post("/admin/v1/models/tiny-gated/promote")
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["stable_model"] == "tiny-v2"
