"""`kill -9` of a worker, a gateway and a stream processor of the multi-process deployment, under load:
every response a client received in full is on the ledger exactly once, nothing is billed twice, and the
tenant's balance is its grant minus what was billed (on the topic, in the projection and in a replay).

The deployment: a real broker and Postgres, two batch processors in one consumer group, the projector,
two inference workers and two gateways. Eight clients stream through both gateways; each round kills one
component at a seeded random moment (TOLLGATE_CRASH_SEED replays a run) and starts it again.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import time

import httpx
import pytest

from streams.batch_processor import READY_LOG_LINE as PROCESSOR_READY_LOG_LINE
from streams.replay import compare, live_balances, replay
from tests.crash.load import Load, wait_ledger_settled
from tests.fixtures.processes import ComponentProcess, free_port, wait_http_ok
from tests.streams.helpers import create_ledger_topics, stream_settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

GRANT = 10_000_000
CLIENTS = 8
MAX_TOKENS = 24
READY_TIMEOUT_S = 120
SETTLE_TIMEOUT_S = 120
LOAD_BEFORE_KILL_S = (1.0, 4.0)
LOAD_AFTER_RESTART_S = 3.0
VICTIMS = ("worker-1", "gateway-1", "processor-1", "worker-2", "gateway-2", "processor-2")
SEED = int(os.environ.get("TOLLGATE_CRASH_SEED", "11"))


class Deployment:
    def __init__(self, settings, common: dict[str, str], tmp_path) -> None:
        self.settings = settings
        self.common = common
        self.tmp_path = tmp_path
        self.processes: dict[str, ComponentProcess] = {}
        self.urls: dict[str, str] = {}

    def launch(self, name: str, module: str, **env: str) -> None:
        env = {**self.common, "TOLLGATE_SPOOL_PATH": str(self.tmp_path / f"{name}-spool.sqlite3"), **env}
        self.processes[name] = ComponentProcess(module, env, self.tmp_path / f"{name}.log").start()

    def wait_ready(self, name: str) -> None:
        process = self.processes[name]
        if name.startswith("processor"):
            process.wait_for_log(PROCESSOR_READY_LOG_LINE, READY_TIMEOUT_S)
        elif name in self.urls:
            wait_http_ok(f"{self.urls[name]}/health", process, READY_TIMEOUT_S)

    def gateway_urls(self) -> list[str]:
        return [url for name, url in self.urls.items() if name.startswith("gateway")]

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()


@pytest.fixture
def deployment(kafka_broker, database_url, topic_prefix, tmp_path):
    settings = stream_settings(kafka_broker.bootstrap, topic_prefix, tmp_path)
    asyncio.run(create_ledger_topics(settings))
    worker_ports = [free_port(), free_port()]
    common = {
        "TOLLGATE_KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap,
        "TOLLGATE_TOPIC_PREFIX": topic_prefix,
        "TOLLGATE_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "DATABASE_URL": database_url,
        "TOLLGATE_ADMIN_TOKEN": secrets.token_urlsafe(32),
        "TOLLGATE_INTERNAL_TOKEN": secrets.token_urlsafe(32),
        "TOLLGATE_ADMISSION_GATEWAY_PROCESSES": "2",
        "TOLLGATE_PROCESSOR_SESSION_TIMEOUT_MS": "6000",
        "TOLLGATE_PROCESSOR_HEARTBEAT_INTERVAL_MS": "1000",
    }
    deployment = Deployment(settings, common, tmp_path)
    try:
        for number in (1, 2):
            deployment.launch(
                f"processor-{number}",
                "streams.batch_processor",
                TOLLGATE_PROCESSOR_APP_ID=topic_prefix + "ledger",
            )
        deployment.launch(
            "projector", "streams.projector", TOLLGATE_PROJECTOR_NAME=topic_prefix + "projector"
        )
        for number, port in enumerate(worker_ports, start=1):
            name = f"worker-{number}"
            deployment.launch(
                name,
                "inference.worker",
                TOLLGATE_WORKER_PORT=str(port),
                TOLLGATE_WORKER_ENGINE__DEVICE="cpu",
                TOLLGATE_WORKER_ENGINE__TORCH_THREADS="1",
            )
            deployment.urls[name] = f"http://127.0.0.1:{port}"
        worker_urls = "[" + ",".join(f'"http://127.0.0.1:{port}"' for port in worker_ports) + "]"
        for number in (1, 2):
            port = free_port()
            deployment.launch(
                f"gateway-{number}",
                "gateway",
                TOLLGATE_GATEWAY_PORT=str(port),
                TOLLGATE_GATEWAY_WORKER_URLS=worker_urls,
            )
            deployment.urls[f"gateway-{number}"] = f"http://127.0.0.1:{port}"
        for name in deployment.processes:
            deployment.wait_ready(name)
        yield deployment
    except BaseException:
        for name, process in deployment.processes.items():
            print(f"== {name}\n{process.log_tail(30)}")
        raise
    finally:
        deployment.stop()


def test_kill_9_of_each_component_under_load_bills_every_complete_response_once(deployment):
    rng = random.Random(SEED)
    gateway_urls = deployment.gateway_urls()
    admin = httpx.Client(
        base_url=gateway_urls[0],
        headers={"Authorization": f"Bearer {deployment.common['TOLLGATE_ADMIN_TOKEN']}"},
        timeout=30,
    )
    with admin:
        tenant_id = admin.post("/admin/v1/tenants", json={"name": "crash", "tier": "enterprise"}).json()[
            "tenant_id"
        ]
        key = admin.post(f"/admin/v1/tenants/{tenant_id}/keys").json()["key"]
        granted = admin.post(
            f"/admin/v1/tenants/{tenant_id}/grants",
            json={"amount": GRANT},
            headers={"Idempotency-Key": "crash-grant"},
        )
        assert granted.status_code == 201, granted.text
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while tenant_id not in asyncio.run(live_balances(deployment.settings)):
            assert time.monotonic() < deadline, "the grant was never folded"
            time.sleep(0.5)
        time.sleep(2)  # both gateways' views tail ledger.balances

        with Load(gateway_urls, key, CLIENTS, MAX_TOKENS) as load:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while load.complete_count() < CLIENTS and time.monotonic() < deadline:
                time.sleep(0.1)
            for victim in VICTIMS:
                time.sleep(rng.uniform(*LOAD_BEFORE_KILL_S))
                deployment.processes[victim].kill()
                time.sleep(rng.uniform(0.0, 1.0))
                deployment.processes[victim].start()
                deployment.wait_ready(victim)
                served = load.complete_count()
                time.sleep(LOAD_AFTER_RESTART_S)
                assert load.complete_count() > served, (
                    f"nothing served after {victim} restarted (seed {SEED})"
                )
        outcomes = load.outcomes

        figures = wait_ledger_settled(admin, tenant_id, GRANT, outcomes, SETTLE_TIMEOUT_S)
        billed = figures["billed"]
        live = asyncio.run(live_balances(deployment.settings))
        assert live[tenant_id].balance == GRANT - billed, "ledger.balances agrees with the projection"
        assert compare(asyncio.run(replay(deployment.settings)), live) == [], (
            "a replay of ledger.events agrees"
        )
        print(f"seed {SEED}: {figures}")
