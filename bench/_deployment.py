"""The multi-process deployment for benchmarks: a local Kafka broker, an embedded Postgres, the ledger
topics, and as separate OS processes one batch stream processor, the projector, one inference worker (CPU,
one torch thread) and one gateway; a tenant with a key and a grant created through the admin API.

    with distributed_deployment(directory) as deployment:
        deployment.gateway_url, deployment.worker_url, deployment.api_key
        deployment.pids                 {"gateway": pid, "worker": pid, "processor": pid, "projector": pid}
        deployment.postgres_pid         the postmaster

Everything runs under `directory` (logs, spools, the processor's state, Postgres' data) and is stopped on
the way out, whatever happened in the block: the components first (gateway, worker, projector, processor:
callers before what they call), then Postgres and the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench._kafka_bench_util import ChildProcess, LocalBroker, local_broker
from gateway.admission.settings import AdmissionSettings
from storage.database import start_embedded_postgres, upgrade_database
from streams.batch_processor import READY_LOG_LINE as PROCESSOR_READY_LOG_LINE
from streams.replay import live_balances
from streams.settings import StreamSettings
from streams.topics import ensure_topics, ledger_topic_specs

PARTITIONS = 2
TENANT_TIER = "enterprise"  # the highest rate limits: the soak measures leaks, not the limiter
GRANT = 10_000_000_000  # credits; far more than any soak bills, so admission never refuses for credit
READY_TIMEOUT_S = 180
SETTLE_TIMEOUT_S = 60
POLL_INTERVAL_S = 0.2
HTTP_TIMEOUT_S = 30
VIEW_LAG_CHECK_INTERVAL_S = AdmissionSettings().view_lag_check_interval_ms / 1000
BALANCES_LAG = re.compile(
    r'^tollgate_ledger_view_lag_records\{topic="[^"]*ledger\.balances"\} (\S+)$', re.MULTILINE
)
COMPONENTS = ("processor", "projector", "worker", "gateway")  # start order; stopped in reverse


@dataclass(frozen=True)
class Deployment:
    gateway_url: str
    worker_url: str
    api_key: str
    tenant_id: str
    processes: dict[str, ChildProcess]  # component name -> its process
    postgres_pid: int
    broker_pid: int

    @property
    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self.processes.items()}

    def assert_alive(self) -> None:
        """Raise, with its log, when a component has exited: a soak with a dead component measures nothing."""
        for name, process in self.processes.items():
            if not process.alive():
                raise RuntimeError(f"the {name} exited during the soak:\n{process.log_tail()}")


def _component_processes(
    directory: Path,
    broker: LocalBroker,
    database_url: str,
    topic_prefix: str,
    worker_port: int,
    gateway_port: int,
    admin_token: str,
) -> dict[str, ChildProcess]:
    common = {
        "DATABASE_URL": database_url,
        "TOLLGATE_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "TOLLGATE_TOPIC_PREFIX": topic_prefix,
        "TOLLGATE_TOPIC_PARTITIONS": str(PARTITIONS),
        "TOLLGATE_ADMIN_TOKEN": admin_token,
        "TOLLGATE_INTERNAL_TOKEN": secrets.token_urlsafe(32),
    }

    def child(name: str, module: str, **env: str) -> ChildProcess:
        spool = {"TOLLGATE_SPOOL_PATH": str(directory / f"{name}-spool.sqlite3")}
        return ChildProcess(module, {**common, **spool, **env}, directory / f"{name}.log")

    return {
        "processor": child(
            "processor",
            "streams.batch_processor",
            TOLLGATE_PROCESSOR_APP_ID=topic_prefix + "ledger",
            TOLLGATE_PROCESSOR_DATA_DIR=str(directory / "processor-state"),
        ),
        "projector": child(
            "projector", "streams.projector", TOLLGATE_PROJECTOR_NAME=topic_prefix + "projector"
        ),
        "worker": child(
            "worker",
            "inference.worker",
            TOLLGATE_WORKER_PORT=str(worker_port),
            TOLLGATE_WORKER_ENGINE__DEVICE="cpu",
            TOLLGATE_WORKER_ENGINE__TORCH_THREADS="1",
        ),
        "gateway": child(
            "gateway",
            "gateway",
            TOLLGATE_GATEWAY_PORT=str(gateway_port),
            TOLLGATE_GATEWAY_WORKER_URLS=f'["http://127.0.0.1:{worker_port}"]',
        ),
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


def _stop_postgres(pgdata: Path) -> None:
    # start_embedded_postgres keeps its handle there; cleanup() stops the server now, not at exit
    import pgserver

    pgserver.get_server(pgdata.resolve(), cleanup_mode="delete").cleanup()


async def _wait_http_ok(url: str, process: ChildProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        while time.monotonic() < deadline:
            if not process.alive():
                raise RuntimeError(f"{process.module} exited:\n{process.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(POLL_INTERVAL_S)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s}s:\n{process.log_tail()}")


async def _wait_ready(processes: dict[str, ChildProcess], worker_url: str, gateway_url: str) -> None:
    await asyncio.gather(
        processes["processor"].wait_for_log(PROCESSOR_READY_LOG_LINE, READY_TIMEOUT_S),
        _wait_http_ok(f"{worker_url}/health", processes["worker"], READY_TIMEOUT_S),
        _wait_http_ok(f"{gateway_url}/health", processes["gateway"], READY_TIMEOUT_S),
    )


async def _ok(response_awaitable) -> dict:
    response = await response_awaitable
    if response.status_code not in (200, 201):
        raise RuntimeError(
            f"{response.request.method} {response.request.url}: {response.status_code} {response.text}"
        )
    return response.json()


async def _create_tenant(gateway_url: str, admin_token: str) -> tuple[str, str]:
    """A tenant with a key and GRANT credits; returns (tenant id, API key)."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with httpx.AsyncClient(base_url=gateway_url, headers=headers, timeout=HTTP_TIMEOUT_S) as admin:
        tenant_id = (await _ok(admin.post("/admin/v1/tenants", json={"name": "soak", "tier": TENANT_TIER})))[
            "tenant_id"
        ]
        key = (await _ok(admin.post(f"/admin/v1/tenants/{tenant_id}/keys")))["key"]
        await _ok(
            admin.post(
                f"/admin/v1/tenants/{tenant_id}/grants",
                json={"amount": GRANT},
                headers={"Idempotency-Key": f"soak-grant-{tenant_id}"},
            )
        )
    return tenant_id, key


async def _wait_grant_admitted(settings: StreamSettings, gateway_url: str, tenant_id: str, processes) -> None:
    """Until the gateway's admission view holds the grant: the fold has put the balance on ledger.balances,
    and a lag check of the view (every VIEW_LAG_CHECK_INTERVAL_S) that ran after it reports nothing unread."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while (record := (await live_balances(settings)).get(tenant_id)) is None or record.balance != GRANT:
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"the grant was not folded onto ledger.balances within {SETTLE_TIMEOUT_S}s:\n"
                f"{processes['processor'].log_tail()}"
            )
        await asyncio.sleep(POLL_INTERVAL_S)
    await asyncio.sleep(2 * VIEW_LAG_CHECK_INTERVAL_S)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        while (
            found := BALANCES_LAG.search((await client.get(f"{gateway_url}/metrics")).text)
        ) is None or float(found.group(1)):
            if time.monotonic() >= deadline:
                raise TimeoutError("the gateway's admission view did not catch up with ledger.balances")
            await asyncio.sleep(POLL_INTERVAL_S)


def _stop_all(processes: dict[str, ChildProcess]) -> None:
    for name in reversed(COMPONENTS):
        processes[name].stop()


@contextlib.contextmanager
def distributed_deployment(directory: Path) -> Iterator[Deployment]:
    """The deployment running under `directory` for the block (see the module docstring)."""
    with local_broker() as broker:
        pgdata = directory / "pgdata"
        database_url = start_embedded_postgres(pgdata, delete_on_exit=True)
        try:
            upgrade_database(database_url)
            topic_prefix = f"soak.{uuid.uuid4().hex[:8]}."
            settings = StreamSettings(
                kafka_bootstrap_servers=broker.bootstrap,
                topic_prefix=topic_prefix,
                topic_partitions=PARTITIONS,
            )
            asyncio.run(ensure_topics(settings.kafka_bootstrap_servers, ledger_topic_specs(settings)))
            worker_port, gateway_port, admin_token = _free_port(), _free_port(), secrets.token_urlsafe(32)
            worker_url, gateway_url = f"http://127.0.0.1:{worker_port}", f"http://127.0.0.1:{gateway_port}"
            processes = _component_processes(
                directory, broker, database_url, topic_prefix, worker_port, gateway_port, admin_token
            )
            try:
                for name in COMPONENTS:
                    processes[name].start()
                asyncio.run(_wait_ready(processes, worker_url, gateway_url))
                tenant_id, api_key = asyncio.run(_create_tenant(gateway_url, admin_token))
                asyncio.run(_wait_grant_admitted(settings, gateway_url, tenant_id, processes))
                yield Deployment(
                    gateway_url=gateway_url,
                    worker_url=worker_url,
                    api_key=api_key,
                    tenant_id=tenant_id,
                    processes={name: processes[name] for name in COMPONENTS},
                    postgres_pid=_postmaster_pid(pgdata),
                    broker_pid=broker.pid,
                )
            finally:
                _stop_all(processes)
        finally:
            _stop_postgres(pgdata)
