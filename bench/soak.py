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
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

MODEL = "tollgate-tiny"
START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 30
REQUEST_TIMEOUT_S = 60
FLAT_GROWTH_MAX = 0.10
FLAT_SOCKETS_SLACK = 2
MAX_TOKENS = 16
RESERVATIONS_GAUGE = re.compile(rb"^tollgate_admission_reservations_open\{[^}]*\} ([0-9.e+-]+)$", re.MULTILINE)
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_dev(data_dir: Path, port: int, worker_port: int, log_path: Path) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TOLLGATE_DATABASE_URL")}
    return subprocess.Popen(
        [sys.executable, "-m", "tollgate", "dev", "--data-dir", str(data_dir), "--port", str(port),
         "--worker-port", str(worker_port)],
        cwd=REPO_ROOT, env={**environment, "PYTHONUNBUFFERED": "1"},
        stdout=log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
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


def open_sockets(pid: int) -> int:
    count = 0
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(entry).startswith("socket:")
        except OSError:
            continue
    return count


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


async def one_request(client: httpx.AsyncClient, key: str, number: int, load: Load) -> None:
    body = {
        "model": MODEL, "max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"Soak request {number}: once upon a time"}],
    }
    load.requests += 1
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as response:
            if response.status_code != 200:
                kind = f"http_{response.status_code}"
                load.failure_kinds[kind] = load.failure_kinds.get(kind, 0) + 1
                load.failures += 1
                await response.aread()
                return
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line[len("data: "):]).get("usage")
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


async def soak(options: argparse.Namespace, dev: subprocess.Popen, demo: dict, data_dir: Path) -> dict:
    base_url = demo["base_url"].removesuffix("/v1")
    key = demo["api_key"]
    warmup, measured = Load(), Load()
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as probe:
        await drive(base_url, key, options.concurrency, options.warmup_seconds, warmup)
        await asyncio.sleep(options.settle_seconds)
        start = await sample(probe, dev.pid, data_dir)
        await drive(base_url, key, options.concurrency, options.seconds, measured)
        await asyncio.sleep(options.settle_seconds)
        end = await sample(probe, dev.pid, data_dir)
    sockets_flat = end.open_sockets <= max(start.open_sockets * (1 + FLAT_GROWTH_MAX), start.open_sockets + FLAT_SOCKETS_SLACK)
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
        "start": start.__dict__,
        "end": end.__dict__,
        "dev_rss_growth": growth(start.dev_rss_mb, end.dev_rss_mb),
        "postgres_rss_growth": growth(start.postgres_rss_mb, end.postgres_rss_mb),
        "dev_rss_flat": abs(growth(start.dev_rss_mb, end.dev_rss_mb)) <= FLAT_GROWTH_MAX,
        "postgres_rss_flat": abs(growth(start.postgres_rss_mb, end.postgres_rss_mb)) <= FLAT_GROWTH_MAX,
        "sockets_flat": sockets_flat,
        "no_open_reservations": end.reservations_open == 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="measured load after warm-up")
    parser.add_argument("--warmup-seconds", type=float, default=20.0)
    parser.add_argument("--settle-seconds", type=float, default=3.0, help="quiet time before each sample")
    parser.add_argument("--concurrency", type=int, default=8)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tollgate-soak-") as directory:
        data_dir, log_path = Path(directory) / ".tollgate", Path(directory) / "dev.log"
        dev = start_dev(data_dir, free_port(), free_port(), log_path)
        try:
            demo = wait_for_demo(dev, data_dir, log_path)
            result = asyncio.run(soak(options, dev, demo, data_dir))
        finally:
            if dev.poll() is None:
                os.killpg(dev.pid, signal.SIGINT)
                try:
                    dev.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(dev.pid, signal.SIGKILL)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
