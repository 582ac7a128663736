"""`tollgate dev` (what `make run` calls): the whole system in one process, on embedded defaults.

    embedded PostgreSQL (pgserver, data in .tollgate/pgdata; DATABASE_URL wins when set)
    the event log in that Postgres (streams.embedded_log), the ledger processor and the projector over it
    one inference worker on the default model (CUDA when present, CPU otherwise) on 127.0.0.1:8100
    the gateway on 127.0.0.1:8000

On start it creates, once, a demo tenant with credits and an API key, prints them with a curl and an
openai-client example, and writes .tollgate/demo.json (readable by its owner only: it holds the admin
token and the key). Ctrl-C (or SIGTERM) stops everything cleanly; a second run finds its data, its demo
tenant and its admin token again.

The console shows the progress, the banner and warnings, in plain text; `-v` brings back every
component's and library's lines (tollgate.logging_setup). A port already taken or a data directory
another run owns is one line naming the option to change (tollgate.operating_errors), not a traceback.

The embedded Postgres is a separate process (pg_ctl starts it in its own session), so a `kill -9` of
this one would leave it running, and pgserver would keep the dead run's pid in its handle list and never
stop the server again. Two guards: a watchdog process, in its own session, that stops the postmaster this
run started as soon as this process is gone however it ended (its stdin pipe reaches EOF); and, on
start, a postmaster of this data directory whose owners are all dead is stopped (pg_ctl stop -m fast)
and the dead pids are dropped from the handle list, before a fresh server is started. The owner of the
data directory is written to .tollgate/dev.pid; a second `tollgate dev` on a live owner's data refuses
to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from tollgate.logging_setup import configure_logging
from tollgate.operating_errors import OperatingError, PortInUse

log = logging.getLogger("tollgate.dev")

HEALTH_TIMEOUT_S = 120
DEMO_TENANT_NAME = "demo"
DEMO_TIER = "pro"
DEMO_CREDITS = 10_000_000
DEMO_GRANT_IDEMPOTENCY_KEY = "tollgate-dev-demo-grant"
SHUTDOWN_TIMEOUT_S = 20
DEMO_READY_TIMEOUT_S = 60
DEMO_READY_POLL_S = 0.1
SECRET_FILE_MODE = 0o600  # demo.json holds the admin token and an API key
DATA_DIR_MODE = 0o700
OWNER_FILE_NAME = "dev.pid"  # {"pid", "created_at", "watchdog_pid"} of the run that owns the data directory
PG_HANDLES_FILE_NAME = ".handle_pids.json"  # pgserver's list of the processes using a data directory
POSTGRES_STOP_TIMEOUT_S = 30


@dataclass(frozen=True)
class DevOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    worker_port: int = 8100
    data_dir: Path = Path(".tollgate")
    verbose: bool = False


class DataDirInUse(OperatingError):
    """Another live `tollgate dev` owns the data directory."""


def run_dev(options: DevOptions) -> None:
    configure_logging(log_format="plain", quiet=not options.verbose)
    check_port_free(options.host, options.port, "--port")
    check_port_free("127.0.0.1", options.worker_port, "--worker-port")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(options))


def check_port_free(host: str, port: int, option: str) -> None:
    """Raise PortInUse, naming `option`, when `host:port` cannot be bound (checked before anything starts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # as uvicorn binds: TIME_WAIT is no conflict
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise PortInUse(
                f"{host}:{port} is already in use ({error.strerror}): stop what holds it, "
                f"or choose another with {option}"
            ) from None


async def _run(options: DevOptions) -> None:
    from gateway.__main__ import start_gateway
    from gateway.admin.settings import AdminSettings
    from gateway.settings import GatewaySettings
    from inference.settings import WorkerSettings
    from inference.worker import create_app as create_worker_app
    from storage.database import DatabaseSettings, build_async_engine, build_session_factory, prepare_database
    from streams.embedded_log import PostgresLog
    from streams.embedded_processor import EmbeddedProcessor
    from streams.embedded_projector import EmbeddedProjector
    from streams.settings import StreamSettings
    from streams.webhooks.dispatcher import WebhookDispatcher
    from streams.webhooks.settings import WebhookSettings
    from tollgate.topup_agent import TopUpAgent

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    data_dir = options.data_dir.resolve()
    data_dir.mkdir(mode=DATA_DIR_MODE, parents=True, exist_ok=True)
    demo_file = data_dir / "demo.json"
    if demo_file.exists():
        demo_file.chmod(SECRET_FILE_MODE)  # written 0644 by earlier versions
    demo = json.loads(demo_file.read_text()) if demo_file.exists() else {}
    admin_token = demo.get("admin_token") or secrets.token_urlsafe(32)

    database_settings = DatabaseSettings(embedded_data_dir=data_dir / "pgdata")
    embedded = database_settings.database_url is None
    if embedded:
        claim_data_dir(data_dir, database_settings.embedded_data_dir)
    log.info("starting PostgreSQL and migrating (first start takes a little longer)")
    url = await asyncio.to_thread(prepare_database, database_settings)
    if embedded:
        watch_embedded_postgres(data_dir, database_settings.embedded_data_dir)
    engine = build_async_engine(url, database_settings)
    sessions = build_session_factory(engine)

    event_log = PostgresLog(engine, StreamSettings())
    await event_log.start()
    processor = EmbeddedProcessor(event_log)
    await processor.start()
    projector = EmbeddedProjector(event_log, sessions)
    webhook_dispatcher = WebhookDispatcher(event_log, sessions, WebhookSettings())  # alerts -> endpoints
    top_up_agent = TopUpAgent(event_log, sessions, AdminSettings())  # top-up alerts -> grants

    internal_token = dev_internal_token()
    worker_settings = WorkerSettings(host="127.0.0.1", port=options.worker_port)
    worker_app = create_worker_app(
        worker_settings, emit_usage=event_log.publish, internal_token=internal_token
    )

    gateway_settings = GatewaySettings(
        host=options.host,
        port=options.port,
        worker_urls=[f"http://127.0.0.1:{options.worker_port}"],
        admin_token=admin_token,
    )
    gateway_app, admission_runtime = await start_gateway(
        gateway_settings, event_log, engine, sessions, internal_token=internal_token
    )
    server_log_level = "info" if options.verbose else "warning"
    servers = [
        _server(worker_app, "127.0.0.1", options.worker_port, server_log_level),
        _server(gateway_app, options.host, options.port, server_log_level),
    ]
    tasks = [
        asyncio.create_task(processor.run(stop), name="ledger-processor"),
        asyncio.create_task(projector.run(stop), name="projector"),
        asyncio.create_task(webhook_dispatcher.run(stop), name="webhook-dispatcher"),
        asyncio.create_task(top_up_agent.run(stop), name="top-up-agent"),
        *[asyncio.create_task(server.serve(), name="http") for server in servers],
    ]
    base = f"http://{options.host}:{options.port}"
    try:
        await _wait_healthy([f"http://127.0.0.1:{options.worker_port}/health", f"{base}/health"], tasks, stop)
        if stop.is_set():
            return
        demo = await _ensure_demo_tenant(base, admin_token, demo)
        await _wait_demo_credits_visible(base, admin_token, demo["tenant_id"], admission_runtime.view, tasks)
        write_secret_file(demo_file, json.dumps(demo, indent=2) + "\n")
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


def dev_internal_token() -> str:
    """The gateway <-> worker secret: TOLLGATE_INTERNAL_TOKEN when set (checked), else a new random one per
    run (both ends live in this process, so nothing needs to remember it)."""
    from inference.internal_auth import InternalAuthSettings

    settings = InternalAuthSettings()
    return settings.required_token() if settings.token is not None else secrets.token_urlsafe(32)


def write_secret_file(path: Path, text: str) -> None:
    """Replace `path` atomically with `text`, readable by its owner only: the temporary file is created
    0600 (mkstemp) beside it, so the secret is never on disk with a wider mode, then renamed over it."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, SECRET_FILE_MODE)  # mkstemp's mode already; said explicitly
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


# ------------------------------------------------------------------------------- the embedded Postgres


def claim_data_dir(data_dir: Path, pgdata: Path) -> None:
    """Make this process the owner of `data_dir`: refuse when a live `tollgate dev` owns it, stop a
    postmaster its dead owners left running, and drop dead pids from pgserver's handle list (or no later
    run would ever stop the server: pgserver stops it only when the exiting process is its last handle)."""
    owner = _read_owner(data_dir)
    if (
        owner is not None
        and owner["pid"] != os.getpid()
        and _is_process(owner["pid"], owner.get("created_at"))
    ):
        raise DataDirInUse(
            f"another tollgate dev (pid {owner['pid']}) is running on {data_dir}: stop it first, "
            "or give this one its own --data-dir"
        )
    stop_orphaned_postmaster(pgdata)
    _write_owner(data_dir, {"pid": os.getpid(), "created_at": _created_at(os.getpid())})


def stop_orphaned_postmaster(pgdata: Path) -> int | None:
    """Stop the postmaster of `pgdata` when no process that uses it is alive; prune the dead from the
    handle list. Returns the pid of the postmaster it stopped, or None."""
    from pgserver.postgres_server import PostgresServer
    from pgserver.utils import DiskList, PostmasterInfo

    if not pgdata.exists():
        return None
    with PostgresServer._lock:  # pgserver's own inter-process lock over handle lists and starts
        handles = DiskList(pgdata / PG_HANDLES_FILE_NAME)
        live = [pid for pid in handles.get() if pid != os.getpid() and _is_process(pid)]
        handles.put(live)
        info = PostmasterInfo.read_from_pgdata(pgdata)
        if live or info is None or not _is_process(info.pid):
            return None
        log.warning("stopping the PostgreSQL (pid %d) a previous run left running in %s", info.pid, pgdata)
        _stop_postmaster(pgdata, info.pid)
        return info.pid


def _stop_postmaster(pgdata: Path, pid: int) -> None:
    """pg_ctl stop -m fast (as the user pgserver runs postgres as); signals if that fails."""
    from pgserver._commands import pg_ctl

    user = "pgserver" if os.name == "posix" and os.geteuid() == 0 else None  # pgserver's rule
    try:
        pg_ctl(["-w", "-t", str(POSTGRES_STOP_TIMEOUT_S), "-m", "fast", "stop"], pgdata=pgdata, user=user)
    except (subprocess.SubprocessError, OSError) as error:
        log.warning("pg_ctl stop failed (%s); terminating the postmaster %d", error, pid)
        _terminate(pid)


def _terminate(pid: int) -> None:
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        process = psutil.Process(pid)
        process.terminate()  # SIGTERM: postgres's smart shutdown
        try:
            process.wait(POSTGRES_STOP_TIMEOUT_S)
        except psutil.TimeoutExpired:
            process.kill()


def watch_embedded_postgres(data_dir: Path, pgdata: Path) -> subprocess.Popen | None:
    """Start the watchdog that stops the postmaster running now when this process ends however it ends."""
    from pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata.resolve())
    if info is None:
        return None
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "tollgate.dev", "--watch-postgres", str(pgdata.resolve()), str(info.pid)],
        stdin=subprocess.PIPE,  # its read end reaches EOF when this process is gone: the only signal needed
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # outlives a kill of this process's group
    )
    _WATCHDOGS.append(watchdog)  # keeps the pipe's write end open for this process's lifetime
    owner = _read_owner(data_dir) or {"pid": os.getpid(), "created_at": _created_at(os.getpid())}
    _write_owner(data_dir, {**owner, "watchdog_pid": watchdog.pid})
    return watchdog


_WATCHDOGS: list[subprocess.Popen] = []


def _watch_postgres(pgdata: Path, postmaster_pid: int) -> None:
    """The watchdog's body: wait for EOF from the parent, then stop that postmaster if it still runs (a
    clean exit has stopped it already; a newer run's postmaster has another pid and is left alone)."""
    from pgserver.utils import PostmasterInfo

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while sys.stdin.buffer.read(4096):
        pass
    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is not None and info.pid == postmaster_pid and _is_process(postmaster_pid):
        _stop_postmaster(pgdata, postmaster_pid)


def _is_process(pid: int, created_at: float | None = None) -> bool:
    """Whether `pid` is a live process (not a zombie) and, when given, the one created at `created_at`."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return created_at is None or abs(process.create_time() - created_at) < 1.0
    except psutil.Error:
        return False


def _created_at(pid: int) -> float:
    import psutil

    return psutil.Process(pid).create_time()


def _read_owner(data_dir: Path) -> dict | None:
    with contextlib.suppress(FileNotFoundError, ValueError):
        owner = json.loads((data_dir / OWNER_FILE_NAME).read_text())
        if isinstance(owner, dict) and isinstance(owner.get("pid"), int):
            return owner
    return None


def _write_owner(data_dir: Path, owner: dict) -> None:
    write_secret_file(data_dir / OWNER_FILE_NAME, json.dumps(owner) + "\n")


# ------------------------------------------------------------------------------------------ helpers


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT/SIGTERM to this process. uvicorn (0.29+) installs its own
    handlers for the whole of `serve()` and re-raises the signal when it returns: with two servers in one
    process the second's handler replaced the loop's, one server stopped on Ctrl-C, re-raised the signal, and
    the loop was torn down under the other's lifespan (a CancelledError traceback on Ctrl-C, now and then)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _server(app, host: str, port: int, log_level: str) -> uvicorn.Server:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=None, lifespan="on")
    return _EmbeddedServer(config)  # log_config=None: the one logging setup stays in charge


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
        tenant = await _ok(
            admin.post("/admin/v1/tenants", json={"name": DEMO_TENANT_NAME, "tier": DEMO_TIER})
        )
        tenant_id = tenant["tenant_id"]
        key = await _ok(admin.post(f"/admin/v1/tenants/{tenant_id}/keys"))
        await _ok(
            admin.post(
                f"/admin/v1/tenants/{tenant_id}/grants",
                json={"amount": DEMO_CREDITS},
                headers={"Idempotency-Key": f"{DEMO_GRANT_IDEMPOTENCY_KEY}-{tenant_id}"},
            )
        )
    return {
        "base_url": f"{base}/v1",
        "api_key": key["key"],
        "admin_token": admin_token,
        "tenant_id": tenant_id,
    }


async def _wait_demo_credits_visible(
    base: str, admin_token: str, tenant_id: str, view, tasks: list[asyncio.Task]
) -> None:
    """Until the demo tenant's balance is folded and both readers agree on it: the gateway's admission view
    (so the first request printed below is admitted) and the admin API's projection (`tollgate balance`)."""
    deadline = time.monotonic() + DEMO_READY_TIMEOUT_S
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {admin_token}"}, timeout=10.0
    ) as admin:
        while True:
            _raise_if_failed(tasks)
            held = view.balance(tenant_id)
            if held is not None:
                projected = (await _ok(admin.get(f"/admin/v1/tenants/{tenant_id}/balance")))["balance"]
                if projected == held.balance:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the demo tenant's credits were not folded within {DEMO_READY_TIMEOUT_S}s"
                )
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
  console      {base_url.removesuffix("/v1")}/console  (sign in with the admin token)
  (saved in {demo_file})

curl {base_url}/chat/completions \\
  -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
  -d '{{"model": "tollgate-tiny", "messages": [{{"role": "user", "content": "Once upon a time"}}],
       "max_tokens": 32}}'

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


if __name__ == "__main__" and sys.argv[1:2] == ["--watch-postgres"]:
    configure_logging(log_format="plain", quiet=True)  # its console is the dev run's
    _watch_postgres(Path(sys.argv[2]), int(sys.argv[3]))
