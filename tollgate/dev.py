"""`tollgate dev` (what `make run` calls): the whole system in one process, on embedded defaults.

    embedded PostgreSQL (pgserver, data in .tollgate/pgdata; DATABASE_URL wins when set)
    the event log in that Postgres (streams.embedded_log), the ledger processor and the projector over it
    one inference worker on the default model (CUDA when present, CPU otherwise) on 127.0.0.1:8100
    the gateway on 127.0.0.1:8000

On start it creates, once, a demo tenant with credits and an API key, prints them with a curl and an
openai-client example, and writes .tollgate/demo.json. Ctrl-C (or SIGTERM) stops everything cleanly; a
second run finds its data, its demo tenant and its admin token again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

log = logging.getLogger("tollgate.dev")

HEALTH_TIMEOUT_S = 120
DEMO_TENANT_NAME = "demo"
DEMO_TIER = "pro"
DEMO_CREDITS = 10_000_000
DEMO_GRANT_IDEMPOTENCY_KEY = "tollgate-dev-demo-grant"
SHUTDOWN_TIMEOUT_S = 20
DEMO_READY_TIMEOUT_S = 60
DEMO_READY_POLL_S = 0.1


@dataclass(frozen=True)
class DevOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    worker_port: int = 8100
    data_dir: Path = Path(".tollgate")


def run_dev(options: DevOptions) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(options))


async def _run(options: DevOptions) -> None:
    from gateway.__main__ import start_gateway
    from gateway.settings import GatewaySettings
    from inference.settings import WorkerSettings
    from inference.worker import create_app as create_worker_app
    from streams.database import DatabaseSettings, build_async_engine, build_session_factory, prepare_database
    from streams.embedded_log import PostgresLog
    from streams.embedded_processor import EmbeddedProcessor
    from streams.embedded_projector import EmbeddedProjector
    from streams.settings import StreamSettings

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    data_dir = options.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    demo_file = data_dir / "demo.json"
    demo = json.loads(demo_file.read_text()) if demo_file.exists() else {}
    admin_token = demo.get("admin_token") or secrets.token_urlsafe(32)

    database_settings = DatabaseSettings(embedded_data_dir=data_dir / "pgdata")
    log.info("starting PostgreSQL and migrating (first start takes a little longer)")
    url = await asyncio.to_thread(prepare_database, database_settings)
    engine = build_async_engine(url, database_settings)
    sessions = build_session_factory(engine)

    event_log = PostgresLog(engine, StreamSettings(spool_path=data_dir / "spool.sqlite3"))
    await event_log.start()
    processor = EmbeddedProcessor(event_log)
    await processor.start()
    projector = EmbeddedProjector(event_log, sessions)

    worker_settings = WorkerSettings(host="127.0.0.1", port=options.worker_port)
    worker_app = create_worker_app(worker_settings, emit_usage=event_log.publish)

    gateway_settings = GatewaySettings(
        host=options.host,
        port=options.port,
        worker_urls=[f"http://127.0.0.1:{options.worker_port}"],
        admin_token=admin_token,
    )
    gateway_app, admission_runtime = await start_gateway(gateway_settings, event_log, engine, sessions)
    servers = [
        _server(worker_app, "127.0.0.1", options.worker_port),
        _server(gateway_app, options.host, options.port),
    ]
    tasks = [
        asyncio.create_task(processor.run(stop), name="ledger-processor"),
        asyncio.create_task(projector.run(stop), name="projector"),
        *[asyncio.create_task(server.serve(), name="http") for server in servers],
    ]
    base = f"http://{options.host}:{options.port}"
    try:
        await _wait_healthy([f"http://127.0.0.1:{options.worker_port}/health", f"{base}/health"], tasks, stop)
        if stop.is_set():
            return
        demo = await _ensure_demo_tenant(base, admin_token, demo)
        await _wait_demo_credits_visible(base, admin_token, demo["tenant_id"], admission_runtime.view, tasks)
        demo_file.write_text(json.dumps(demo, indent=2) + "\n")
        _print_banner(demo, demo_file)
        await _until_stopped(stop, tasks)
    finally:
        log.info("stopping")
        for server in servers:
            server.should_exit = True
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_TIMEOUT_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await admission_runtime.stop()
        await event_log.stop()
        await engine.dispose()


def _server(app, host: str, port: int) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    server.install_signal_handlers = lambda: None  # this process handles SIGINT/SIGTERM itself
    return server


async def _until_stopped(stop: asyncio.Event, tasks: list[asyncio.Task]) -> None:
    """Until Ctrl-C, or until a component fails (then its error is raised)."""
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    _raise_if_failed(tasks)


def _raise_if_failed(tasks: list[asyncio.Task]) -> None:
    """A component that died while we wait for something fails the wait with its own error."""
    for task in tasks:
        if task.done() and task.exception() is not None:
            raise task.exception()


async def _wait_healthy(urls: list[str], tasks: list[asyncio.Task], stop: asyncio.Event) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    async with httpx.AsyncClient(timeout=2.0) as client:
        for url in urls:
            while not stop.is_set():
                _raise_if_failed(tasks)
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} not healthy within {HEALTH_TIMEOUT_S}s")
                await asyncio.sleep(0.2)


async def _ensure_demo_tenant(base: str, admin_token: str, demo: dict) -> dict:
    """The demo tenant of an earlier run if it still exists; otherwise a new one with a key and credits."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30.0) as admin:
        tenant_id = demo.get("tenant_id")
        if tenant_id and demo.get("api_key"):
            known = await admin.get(f"/admin/v1/tenants/{tenant_id}/balance")
            if known.status_code == 200:
                return {**demo, "base_url": f"{base}/v1", "admin_token": admin_token}
        tenant = (await _ok(admin.post("/admin/v1/tenants", json={"name": DEMO_TENANT_NAME, "tier": DEMO_TIER})))
        tenant_id = tenant["tenant_id"]
        key = await _ok(admin.post(f"/admin/v1/tenants/{tenant_id}/keys"))
        await _ok(
            admin.post(
                f"/admin/v1/tenants/{tenant_id}/grants",
                json={"amount": DEMO_CREDITS},
                headers={"Idempotency-Key": f"{DEMO_GRANT_IDEMPOTENCY_KEY}-{tenant_id}"},
            )
        )
    return {"base_url": f"{base}/v1", "api_key": key["key"], "admin_token": admin_token, "tenant_id": tenant_id}


async def _wait_demo_credits_visible(base: str, admin_token: str, tenant_id: str, view, tasks: list[asyncio.Task]) -> None:
    """Until the demo tenant's balance is folded and both readers agree on it: the gateway's admission view
    (so the first request printed below is admitted) and the admin API's projection (`tollgate balance`)."""
    deadline = time.monotonic() + DEMO_READY_TIMEOUT_S
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {admin_token}"}, timeout=10.0) as admin:
        while True:
            _raise_if_failed(tasks)
            held = view.balance(tenant_id)
            if held is not None:
                projected = (await _ok(admin.get(f"/admin/v1/tenants/{tenant_id}/balance")))["balance"]
                if projected == held.balance:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the demo tenant's credits were not folded within {DEMO_READY_TIMEOUT_S}s")
            await asyncio.sleep(DEMO_READY_POLL_S)


async def _ok(response_coroutine) -> dict:
    response = await response_coroutine
    if response.status_code >= 400:
        raise RuntimeError(f"admin API answered {response.status_code}: {response.text}")
    return response.json()


def _print_banner(demo: dict, demo_file: Path) -> None:
    base_url, key = demo["base_url"], demo["api_key"]
    print(
        f"""
Tollgate is running.

  base_url     {base_url}
  api_key      {key}
  tenant_id    {demo["tenant_id"]}
  admin_token  {demo["admin_token"]}
  (saved in {demo_file})

curl {base_url}/chat/completions \\
  -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
  -d '{{"model": "tollgate-tiny", "messages": [{{"role": "user", "content": "Once upon a time"}}], "max_tokens": 32}}'

python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base_url}", api_key="{key}")
for chunk in client.chat.completions.create(model="tollgate-tiny", stream=True, max_tokens=32,
        messages=[{{"role": "user", "content": "Once upon a time"}}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
PY

tollgate balance {demo["tenant_id"]}      # watch it fall
Ctrl-C stops everything.
""",
        file=sys.stdout,
        flush=True,
    )
