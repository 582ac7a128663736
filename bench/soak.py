"""Soak benchmark: `python -m bench.soak --seconds N` prints one JSON line.

What it checks: that sustained load leaks nothing. It starts `tollgate dev` (the whole system as a
newcomer runs it: gateway, inference worker and ledger processor in one process, on the embedded
Postgres and event log) on a fresh data directory, drives streamed chat completions through the real
gateway from `--concurrency` clients for `--warmup-seconds`, samples, keeps the same load for
`--seconds`, lets it settle (`--settle-seconds`, no load) and samples again:

    rss_mb            resident memory of the tollgate dev process (gateway + worker + processor) and of
                      the embedded Postgres (postmaster and its backends, summed)
    open_sockets      sockets the tollgate dev process holds (/proc/<pid>/fd), at rest after each phase
    reservations_open the gateway's open admission holds (its /metrics gauge), at rest after each phase

and whether each is flat: RSS and sockets within FLAT_GROWTH_MAX (10%) of the warm sample (sockets:
or within FLAT_SOCKETS_SLACK of it, a pool may keep one more idle connection), and no reservation left
open at rest. The sample after warm-up is the baseline because the first minutes fill caches (the model,
the allocator's arenas, the key cache, connection pools) that are not leaks.

Requests, failures and completion tokens served are in the line too: a soak that served nothing proves
nothing. Default: 120 s of load after 20 s of warm-up, about 2.5 minutes with the start.

`--deployment distributed` soaks the multi-process deployment instead (bench/_deployment.py: a local Kafka
broker, an embedded Postgres, and as separate processes one batch stream processor, the projector, one CPU
inference worker and one gateway, with a tenant, key and grant made through the admin API), so each
component's memory is its own. The same cycle; each sample holds, per component (gateway, worker,
processor, projector):

    rss_mb            resident memory of the component's process tree
    open_sockets      sockets the component's processes hold, at rest

and the gateway's open holds (reservations_open) and the worker's in-flight streams (its /health `running`
and `waiting`), at rest. The verdicts: rss_flat and sockets_flat per component (the rules above),
no_open_reservations, no_streams_in_flight, and `flat`: all of them, and some tokens served. Postgres is
context, not in `flat`: postgres_pss_mb (PSS, not RSS: summing RSS over the backends counts the shared
buffers once per backend that touched them) grows while the ledger's tables grow into shared_buffers, which
is the database caching the data the soak wrote, not a component leaking. About 3 minutes with the
broker's and the worker's start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench._deployment import Deployment, distributed_deployment

MODEL = "tollgate-tiny"
START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 30
REQUEST_TIMEOUT_S = 60
FLAT_GROWTH_MAX = 0.10
FLAT_SOCKETS_SLACK = 2
MAX_TOKENS = 16
RESERVATIONS_GAUGE = re.compile(
    rb"^tollgate_admission_reservations_open\{[^}]*\} ([0-9.e+-]+)$", re.MULTILINE
)
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Load:
    requests: int = 0
    failures: int = 0
    completion_tokens: int = 0
    failure_kinds: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Sample:
    dev_rss_mb: float
    postgres_rss_mb: float
    open_sockets: int
    reservations_open: int


@dataclass(frozen=True)
class DeploymentSample:
    rss_mb: dict[str, float]  # component -> resident memory of its process tree
    postgres_pss_mb: float  # proportional set size of the postmaster and its backends, summed
    open_sockets: dict[str, int]  # component -> sockets its processes hold
    reservations_open: int  # the gateway's open admission holds
    worker_running: int  # sequences the worker's engine is generating
    worker_waiting: int  # requests queued in the worker's engine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_dev(data_dir: Path, port: int, worker_port: int, log_path: Path) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tollgate",
            "dev",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--worker-port",
            str(worker_port),
        ],
        cwd=REPO_ROOT,
        env={**environment, "PYTHONUNBUFFERED": "1"},
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for_demo(process: subprocess.Popen, data_dir: Path, log_path: Path) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tollgate dev exited:\n{log_path.read_text()[-4000:]}")
        if "Tollgate is running" in log_path.read_text():
            return json.loads((data_dir / "demo.json").read_text())
        time.sleep(0.5)
    raise TimeoutError(f"tollgate dev not up within {START_TIMEOUT_S}s")


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "pgdata" / "postmaster.pid").read_text().splitlines()[0])


def tree_rss_mb(pid: int) -> float:
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def tree_pss_mb(pid: int) -> float:
    """As tree_rss_mb, but each shared page counted once over the tree (backends share Postgres' buffers)."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def open_sockets(pid: int) -> int:
    count = 0
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(entry).startswith("socket:")
        except OSError:
            continue
    return count


def tree_open_sockets(pid: int) -> int:
    total = 0
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            total += open_sockets(process.pid)
        except FileNotFoundError:
            continue
    return total


async def reservations_open(client: httpx.AsyncClient) -> int:
    metrics = (await client.get("/metrics")).content
    return int(sum(float(value) for value in RESERVATIONS_GAUGE.findall(metrics)))


async def sample(client: httpx.AsyncClient, dev_pid: int, data_dir: Path) -> Sample:
    return Sample(
        dev_rss_mb=round(psutil.Process(dev_pid).memory_info().rss / 2**20, 1),
        postgres_rss_mb=round(tree_rss_mb(postmaster_pid(data_dir)), 1),
        open_sockets=open_sockets(dev_pid),
        reservations_open=await reservations_open(client),
    )


async def sample_deployment(gateway: httpx.AsyncClient, deployment: Deployment) -> DeploymentSample:
    deployment.assert_alive()
    health = (await gateway.get(f"{deployment.worker_url}/health")).json()
    rss_mb = {name: round(tree_rss_mb(pid), 1) for name, pid in deployment.pids.items()}
    return DeploymentSample(
        rss_mb=rss_mb,
        postgres_pss_mb=round(tree_pss_mb(deployment.postgres_pid), 1),
        open_sockets={name: tree_open_sockets(pid) for name, pid in deployment.pids.items()},
        reservations_open=await reservations_open(gateway),
        worker_running=health["running"],
        worker_waiting=health["waiting"],
    )


async def one_request(client: httpx.AsyncClient, key: str, number: int, load: Load) -> None:
    body = {
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"Soak request {number}: once upon a time"}],
    }
    load.requests += 1
    try:
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            if response.status_code != 200:
                kind = f"http_{response.status_code}"
                load.failure_kinds[kind] = load.failure_kinds.get(kind, 0) + 1
                load.failures += 1
                await response.aread()
                return
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line[len("data: ") :]).get("usage")
                    if usage:
                        load.completion_tokens += usage["completion_tokens"]
    except httpx.HTTPError as error:
        kind = type(error).__name__
        load.failure_kinds[kind] = load.failure_kinds.get(kind, 0) + 1
        load.failures += 1


async def drive(base_url: str, key: str, concurrency: int, seconds: float, load: Load) -> None:
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def client_loop(index: int) -> None:
            number = index
            while time.monotonic() < deadline:
                await one_request(client, key, number, load)
                number += concurrency

        await asyncio.gather(*(client_loop(index) for index in range(concurrency)))


def growth(start: float, end: float) -> float:
    return round((end - start) / start, 4) if start else 0.0


def sockets_flat(start: int, end: int) -> bool:
    return end <= max(start * (1 + FLAT_GROWTH_MAX), start + FLAT_SOCKETS_SLACK)


async def cycle(options: argparse.Namespace, base_url: str, key: str, take_sample: Callable[[], Awaitable]):
    """Warm up, settle, sample, load for options.seconds, settle, sample: (measured load, start, end)."""
    warmup, measured = Load(), Load()
    await drive(base_url, key, options.concurrency, options.warmup_seconds, warmup)
    await asyncio.sleep(options.settle_seconds)
    start = await take_sample()
    await drive(base_url, key, options.concurrency, options.seconds, measured)
    await asyncio.sleep(options.settle_seconds)
    end = await take_sample()
    return measured, start, end


def load_figures(options: argparse.Namespace, measured: Load) -> dict:
    return {
        "bench": "soak",
        "seconds": options.seconds,
        "warmup_seconds": options.warmup_seconds,
        "concurrency": options.concurrency,
        "requests": measured.requests,
        "failures": measured.failures,
        "failure_kinds": measured.failure_kinds,
        "completion_tokens": measured.completion_tokens,
        "requests_per_s": round(measured.requests / options.seconds, 1),
    }


async def soak(options: argparse.Namespace, dev: subprocess.Popen, demo: dict, data_dir: Path) -> dict:
    base_url = demo["base_url"].removesuffix("/v1")
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as probe:
        measured, start, end = await cycle(
            options, base_url, demo["api_key"], lambda: sample(probe, dev.pid, data_dir)
        )
    return {
        **load_figures(options, measured),
        "start": start.__dict__,
        "end": end.__dict__,
        "dev_rss_growth": growth(start.dev_rss_mb, end.dev_rss_mb),
        "postgres_rss_growth": growth(start.postgres_rss_mb, end.postgres_rss_mb),
        "dev_rss_flat": abs(growth(start.dev_rss_mb, end.dev_rss_mb)) <= FLAT_GROWTH_MAX,
        "postgres_rss_flat": abs(growth(start.postgres_rss_mb, end.postgres_rss_mb)) <= FLAT_GROWTH_MAX,
        "sockets_flat": sockets_flat(start.open_sockets, end.open_sockets),
        "no_open_reservations": end.reservations_open == 0,
    }


async def soak_deployment(options: argparse.Namespace, deployment: Deployment) -> dict:
    async with httpx.AsyncClient(base_url=deployment.gateway_url, timeout=REQUEST_TIMEOUT_S) as probe:
        measured, start, end = await cycle(
            options, deployment.gateway_url, deployment.api_key, lambda: sample_deployment(probe, deployment)
        )
    rss_growth = {name: growth(start.rss_mb[name], end.rss_mb[name]) for name in start.rss_mb}
    verdicts = {
        "rss_flat": {name: abs(change) <= FLAT_GROWTH_MAX for name, change in rss_growth.items()},
        "sockets_flat": {
            name: sockets_flat(start.open_sockets[name], end.open_sockets[name])
            for name in start.open_sockets
        },
        "no_open_reservations": end.reservations_open == 0,
        "no_streams_in_flight": end.worker_running == 0 and end.worker_waiting == 0,
    }
    flat = (
        all(verdicts["rss_flat"].values())
        and all(verdicts["sockets_flat"].values())
        and (verdicts["no_open_reservations"] and verdicts["no_streams_in_flight"])
    )
    postgres_growth = growth(start.postgres_pss_mb, end.postgres_pss_mb)
    return {
        **load_figures(options, measured),
        "deployment": "distributed",
        "start": start.__dict__,
        "end": end.__dict__,
        "rss_growth": rss_growth,
        **verdicts,
        "flat": flat and measured.completion_tokens > 0,
        "postgres_pss_growth": postgres_growth,
        "postgres_flat": abs(postgres_growth) <= FLAT_GROWTH_MAX,  # context, not in `flat`: see the docstring
    }


def run_dev(options: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="tollgate-soak-") as directory:
        data_dir, log_path = Path(directory) / ".tollgate", Path(directory) / "dev.log"
        dev = start_dev(data_dir, free_port(), free_port(), log_path)
        try:
            demo = wait_for_demo(dev, data_dir, log_path)
            return asyncio.run(soak(options, dev, demo, data_dir))
        finally:
            if dev.poll() is None:
                os.killpg(dev.pid, signal.SIGINT)
                try:
                    dev.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(dev.pid, signal.SIGKILL)


def exit_on_sigterm(signal_number: int, frame) -> None:
    raise SystemExit(128 + signal_number)  # unwinds through the finally blocks that stop the deployment


def run_distributed(options: argparse.Namespace) -> dict:
    signal.signal(
        signal.SIGINT, signal.default_int_handler
    )  # Ctrl-C unwinds, also when started with SIGINT ignored
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    with (
        tempfile.TemporaryDirectory(prefix="tollgate-soak-distributed-") as directory,
        distributed_deployment(Path(directory)) as deployment,
    ):
        return asyncio.run(soak_deployment(options, deployment))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="measured load after warm-up")
    parser.add_argument("--warmup-seconds", type=float, default=20.0)
    parser.add_argument("--settle-seconds", type=float, default=3.0, help="quiet time before each sample")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--deployment",
        choices=("dev", "distributed"),
        default="dev",
        help="dev: `tollgate dev`, one process; distributed: gateway, worker, processor, projector as processes",  # noqa: E501
        
        
    )
    options = parser.parse_args()
    result = run_dev(options) if options.deployment == "dev" else run_distributed(options)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
