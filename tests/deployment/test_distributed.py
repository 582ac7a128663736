"""The distributed deployment without Docker: a real broker, Postgres, two stream processors in one
consumer group, the projector, one inference worker and two gateway processes. Traffic goes through
both gateways; one processor is stopped half way; every tenant's balance must still be exact."""

from __future__ import annotations

import asyncio
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from inference.settings import WorkerSettings
from ledger.pricing import usage_amount
from streams.batch_processor import READY_LOG_LINE as PROCESSOR_READY_LOG_LINE
from streams.replay import compare, live_balances, replay
from tests.fixtures.processes import ComponentProcess, free_port, wait_http_ok
from tests.streams.helpers import create_ledger_topics, stream_settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

MODEL = "tollgate-tiny"
TENANTS = 3
REQUESTS_PER_TENANT = 8
GRANT = 1_000_000
READY_TIMEOUT_S = 120
CONVERGE_TIMEOUT_S = 90


@pytest.fixture
def cluster(kafka_broker, database_url, topic_prefix, tmp_path):
    settings = stream_settings(kafka_broker.bootstrap, topic_prefix, tmp_path)
    asyncio.run(create_ledger_topics(settings))
    admin_token = secrets.token_urlsafe(32)
    common = {
        "TOLLGATE_KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap,
        "TOLLGATE_TOPIC_PREFIX": topic_prefix,
        "TOLLGATE_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "DATABASE_URL": database_url,
        "TOLLGATE_ADMIN_TOKEN": admin_token,
        "TOLLGATE_INTERNAL_TOKEN": secrets.token_urlsafe(32),  # gateway -> worker
    }
    processes: dict[str, ComponentProcess] = {}

    def launch(name: str, module: str, **env: str) -> ComponentProcess:
        env = {**common, "TOLLGATE_SPOOL_PATH": str(tmp_path / f"{name}-spool.sqlite3"), **env}
        processes[name] = ComponentProcess(module, env, tmp_path / f"{name}.log").start()
        return processes[name]

    try:
        for number in (1, 2):
            launch(
                f"processor-{number}",
                "streams.batch_processor",
                TOLLGATE_PROCESSOR_APP_ID=topic_prefix + "ledger",
            )
        launch("projector", "streams.projector", TOLLGATE_PROJECTOR_NAME=topic_prefix + "projector")
        worker_port = free_port()
        worker = launch("worker", "inference.worker", TOLLGATE_WORKER_PORT=str(worker_port))
        gateway_urls = []
        for number in (1, 2):
            port = free_port()
            launch(
                f"gateway-{number}",
                "gateway",
                TOLLGATE_GATEWAY_PORT=str(port),
                TOLLGATE_GATEWAY_WORKER_URLS=f'["http://127.0.0.1:{worker_port}"]',
            )
            gateway_urls.append(f"http://127.0.0.1:{port}")
        wait_http_ok(f"http://127.0.0.1:{worker_port}/health", worker, READY_TIMEOUT_S)
        for number, url in enumerate(gateway_urls, start=1):
            wait_http_ok(f"{url}/health", processes[f"gateway-{number}"], READY_TIMEOUT_S)
        for number in (1, 2):
            processes[f"processor-{number}"].wait_for_log(PROCESSOR_READY_LOG_LINE, READY_TIMEOUT_S)
        yield settings, gateway_urls, admin_token, processes
    finally:
        for process in processes.values():
            process.stop()


def test_traffic_through_two_gateways_survives_a_processor_stopping(cluster):
    settings, gateway_urls, admin_token, processes = cluster
    admin = httpx.Client(
        base_url=gateway_urls[0], headers={"Authorization": f"Bearer {admin_token}"}, timeout=30
    )
    tenants = []
    for number in range(TENANTS):
        tenant = admin.post(
            "/admin/v1/tenants", json={"name": f"tenant-{number}", "tier": "enterprise"}
        ).json()
        key = admin.post(f"/admin/v1/tenants/{tenant['tenant_id']}/keys").json()["key"]
        granted = admin.post(
            f"/admin/v1/tenants/{tenant['tenant_id']}/grants",
            json={"amount": GRANT},
            headers={"Idempotency-Key": f"grant-{number}"},
        )
        assert granted.status_code == 201, granted.text
        tenants.append((tenant["tenant_id"], key))

    # the balance views must know the grants before the first request is admitted
    wait_until(
        lambda: all(tenant in asyncio.run(live_balances(settings)) for tenant, _ in tenants), "grants folded"
    )

    price = WorkerSettings().models[MODEL].price
    jobs = [
        (tenant, key, gateway_urls[n % 2], n) for tenant, key in tenants for n in range(REQUESTS_PER_TENANT)
    ]

    def call(job) -> tuple[str, int]:
        tenant, key, base_url, n = job
        client = OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=60)
        response = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Tell story number {n}"}], max_tokens=8
        )
        return tenant, usage_amount(price, response.usage.prompt_tokens, response.usage.completion_tokens)

    spent: dict[str, int] = {tenant: 0 for tenant, _ in tenants}
    with ThreadPoolExecutor(max_workers=6) as pool:
        first_half = list(pool.map(call, jobs[::2]))
        processes["processor-2"].stop()  # its partitions move to processor-1
        second_half = list(pool.map(call, jobs[1::2]))
    for tenant, cost in first_half + second_half:
        spent[tenant] += cost

    def exact() -> bool:
        live = asyncio.run(live_balances(settings))
        return all(tenant in live and live[tenant].balance == GRANT - spent[tenant] for tenant in spent)

    wait_until(exact, "every balance equals grant minus what the responses reported")

    def projected() -> bool:  # the admin API answers from the Postgres projection
        return all(
            admin.get(f"/admin/v1/tenants/{tenant}/balance").json()["balance"] == GRANT - spent[tenant]
            for tenant in spent
        )

    wait_until(projected, "the projection agrees")
    assert compare(asyncio.run(replay(settings)), asyncio.run(live_balances(settings))) == []


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + CONVERGE_TIMEOUT_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for: {what}")
