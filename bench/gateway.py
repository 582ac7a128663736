"""Gateway benchmark: `python -m bench.gateway` prints one JSON line.

What it measures: the latency the gateway adds to a streamed completion, against calling the worker
directly with the same requests at the same concurrency, and the gateway's requests/s.

The "fast model" is `CannedTokenWorker`, a BENCHMARK-ONLY stand-in for the inference worker: it speaks
the real worker's NDJSON protocol (POST /internal/v1/generate -> token lines, then a done line) and
streams `max_tokens` canned tokens `--token-interval-ms` apart, using almost no CPU, so what is measured is
the gateway and not the model. Tests never use it; they run the real worker.

Processes: the canned worker and the gateway each run in their own process (uvicorn, uvloop, httptools);
the gateway is the real app (`gateway.app.create_app`): key auth against an embedded Postgres (the cache
is warm after the first request), limits, token counting, the worker pool, SSE, metrics, JSON logs at
WARNING. Admission is `AdmitAllAdmission` (BENCHMARK-ONLY, admits everything): the real admission's
balance view needs the ledger pipeline, which is not what this benchmark is about.

The load generator is a minimal HTTP/1.1 client over asyncio streams (keep-alive, one connection per
concurrent stream), so its own overhead is small and the same for both targets. Per request it records
the time to the first token and the time to the end of the stream. Rounds alternate direct and gateway.
Clients start staggered over one stream's length, so arrivals are spread as in real traffic rather than
200 streams starting in the same millisecond every stream-length (the same for both targets).

    added latency p50/p99 = percentile(gateway) - percentile(direct), per metric (first token, full stream)

`--gateway-processes N` runs N gateway processes on one SO_REUSEPORT port (one per core, as
`TOLLGATE_GATEWAY_REUSE_PORT` deploys them); the kernel spreads the load generator's connections among them.
CPU per request and utilisation (CPU seconds per wall second) are read from /proc for the gateway processes
(summed), the worker and the load generator over each measured round, split into user and kernel time, so
what the three processes sharing the cores cost is in the JSON line. `--profile PATH` writes the gateway's
cProfile stats (it slows the gateway: figures from such a run are not the benchmark's).

Tracing: a second set of gateway processes runs with tracing on (an OpenTelemetry SDK provider whose
batch processor hands every span to an exporter that drops it: what is measured is building and batching
the spans, not a collector's network), measured in rounds of its own alternating with the others; the JSON
line's `tracing_off`/`tracing_on` pair is the gateway's CPU per request and added stream p50 with each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

MODEL = "tollgate-tiny"
READY_TIMEOUT_S = 60
DEFAULT_CONCURRENCY = 200
BENCH_INTERNAL_TOKEN = "bench-internal-token-0123456789abcdef"  # the canned worker does not check it


# ---- the BENCHMARK-ONLY worker stand-in -------------------------------------------------------------


class CannedTokenWorker:
    """ASGI app: the worker's generate protocol with canned tokens (benchmark only, not a model)."""

    def __init__(self, token_interval_ms: float) -> None:
        self.token_interval_s = token_interval_ms / 1000
        self.token_line = b'{"type":"token","text":" tok","token_id":42}\n'
        self._decode = msgspec.json.Decoder(dict).decode

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["path"] != "/internal/v1/generate":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": b'{"status":"ok"}'})
            return
        max_tokens = self._decode(body)["max_tokens"]
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-ndjson")],
            }
        )
        for _ in range(max_tokens):
            await asyncio.sleep(self.token_interval_s)
            await send({"type": "http.response.body", "body": self.token_line, "more_body": True})
        done = {
            "type": "done",
            "finish_reason": "length",
            "prompt_tokens": 3,
            "completion_tokens": max_tokens,
        }
        await send(
            {"type": "http.response.body", "body": json.dumps(done).encode() + b"\n", "more_body": False}
        )


class AdmitAllAdmission:
    """BENCHMARK-ONLY admission: admits every request and holds nothing."""

    async def admit(self, request):
        from gateway.admission.base import Reservation

        return Reservation(request.request_id, request.tenant_id, request.estimated_cost, 0)

    async def finish(self, reservation, actual_cost: int) -> None:
        return None

    async def release(self, reservation) -> None:
        return None


class NoPublishing:
    """The benchmark gateway's event log: nothing is published, nothing arrives on its tails."""

    def __init__(self) -> None:
        from streams.settings import StreamSettings
        from streams.topics import LedgerTopics

        self.topics = LedgerTopics.from_settings(StreamSettings())

    async def publish(self, event) -> None:
        raise RuntimeError("the benchmark gateway publishes nothing")

    async def tail(self, _topic: str, *, from_beginning: bool, batch_max: int = 1_000):
        await asyncio.Event().wait()  # the key revocation feed: no revocations in a benchmark
        yield []


def serve_canned_worker(port: int, token_interval_ms: float) -> None:
    import uvicorn

    uvicorn.run(
        CannedTokenWorker(token_interval_ms),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


class DroppingExporter:
    """A span exporter that keeps nothing (benchmark only): the cost measured is the gateway's own."""

    def export(self, spans) -> object:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def install_tracing() -> None:
    """Tracing on, as `configure_tracing` installs it (a batching SDK provider), spans dropped on export."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DroppingExporter()))
    trace.set_tracer_provider(provider)


def serve_gateway(
    port: int, worker_url: str, database_url: str, profile_path: str | None, tracing: bool = False
) -> None:
    import uvicorn

    from gateway.app import create_app
    from gateway.listener import listening_socket
    from gateway.logs import configure_logging
    from gateway.settings import GatewaySettings
    from storage.database import DatabaseSettings, build_async_engine, build_session_factory

    configure_logging("WARNING")
    if tracing:
        install_tracing()
    settings = GatewaySettings(
        worker_urls=[worker_url],
        admin_token="bench-admin-token-0123456789abcdef",
        worker_connections_max=1024,
    )

    async def run() -> None:
        database_settings = DatabaseSettings(database_url=database_url)
        sessions = build_session_factory(build_async_engine(database_url, database_settings))
        app = create_app(
            settings,
            internal_token=BENCH_INTERNAL_TOKEN,
            log=NoPublishing(),
            admission=AdmitAllAdmission(),
            session_factory=sessions,
        )
        config = uvicorn.Config(
            app, loop="none", http="httptools", log_level="warning", access_log=False, log_config=None
        )
        await uvicorn.Server(config).serve(sockets=[listening_socket("127.0.0.1", port, reuse_port=True)])

    import uvloop

    if profile_path is None:
        uvloop.run(run())
        return
    import cProfile
    import signal

    def exit_on_sigterm(_signal, _frame) -> None:
        raise SystemExit(0)  # uvicorn re-raises the SIGTERM it caught: exit through `finally`, stats written

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        uvloop.run(run())
    finally:
        profiler.disable()
        profiler.dump_stats(profile_path)


# ---- the load generator ----------------------------------------------------------------------------


class HttpConnection:
    """One keep-alive HTTP/1.1 connection that times chunked streaming responses."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, path: str, body: bytes, headers: str) -> tuple[float, float]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        started = time.perf_counter()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n{headers}"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        reader = self.reader
        status_line = await reader.readline()
        if b" 200 " not in status_line:
            raise RuntimeError(f"{path} answered {status_line!r}: {await reader.read(2000)!r}")
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
                chunked = True
        assert chunked, "a streamed response is chunked"
        first_token_s = None
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            data = await reader.readexactly(size + 2)
            if first_token_s is None and (b'"token"' in data or b'"text"' in data):
                first_token_s = time.perf_counter() - started
        total_s = time.perf_counter() - started
        assert first_token_s is not None, "no token arrived"
        return first_token_s, total_s

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def run_round(
    port: int, path: str, make_body, headers: str, concurrency: int, requests: int, stagger_s: float = 0.0
) -> tuple[list, list, float]:
    """`concurrency` clients, each sending its next request when the last one ended. Client i starts
    i/concurrency of `stagger_s` late, so streams of equal length do not all begin (and end) at once."""
    remaining = iter(range(requests))
    first_token: list[float] = []
    total: list[float] = []

    async def client(index: int) -> None:
        await asyncio.sleep(stagger_s * index / concurrency)
        connection = HttpConnection(port)
        try:
            for index in remaining:
                ttft, duration = await connection.request(path, make_body(index), headers)
                first_token.append(ttft)
                total.append(duration)
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(index) for index in range(concurrency)))
    return first_token, total, time.perf_counter() - started


def wait_ready(port: int, process: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"a benchmark server exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered on port {port}")


def prepare_tenant(data_dir: str) -> tuple[str, str]:
    """An embedded Postgres at head with one tenant and key: (database url, presented key)."""
    import psycopg

    from gateway.api_keys import generate_api_key
    from storage.database import start_embedded_postgres, upgrade_database

    url = start_embedded_postgres(Path(data_dir) / "pg", delete_on_exit=True)
    upgrade_database(url)
    key = generate_api_key()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("INSERT INTO tenants VALUES ('bench', 'bench', 'enterprise', 0)")
        connection.execute(
            "INSERT INTO api_keys (key_id, tenant_id, prefix, secret_sha256, created_at_ms) VALUES (%s, 'bench', %s, %s, 0)",  # noqa: E501
            (key.key_id, key.prefix, key.secret_sha256),
        )
    return url, key.presented


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_seconds(*pids: int) -> tuple[float, float]:
    """User and system (kernel: mostly socket calls) CPU time of processes so far, summed (Linux /proc)."""
    user_ticks = system_ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        user_ticks += int(fields[11])
        system_ticks += int(fields[12])
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    return user_ticks / ticks_per_s, system_ticks / ticks_per_s


@dataclass
class RoundTotals:
    """What the measured rounds of one target added up to: latencies, wall time, CPU per process."""

    first_token_s: list[float] = field(default_factory=list)
    stream_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)  # process name -> CPU seconds over the rounds
    system_cpu_s: dict[str, float] = field(default_factory=dict)  # the part of it in the kernel

    def add(
        self,
        first_token_s: list[float],
        stream_s: list[float],
        wall_s: float,
        cpu_s: dict[str, tuple[float, float]],
    ) -> None:
        self.first_token_s += first_token_s
        self.stream_s += stream_s
        self.wall_s += wall_s
        for name, (user_s, system_s) in cpu_s.items():
            self.cpu_s[name] = self.cpu_s.get(name, 0.0) + user_s + system_s
            self.system_cpu_s[name] = self.system_cpu_s.get(name, 0.0) + system_s

    def summary(self) -> dict:
        requests = len(self.stream_s)
        return {
            "first_token_p50_ms": percentile(self.first_token_s, 0.5) * 1000,
            "first_token_p99_ms": percentile(self.first_token_s, 0.99) * 1000,
            "stream_p50_ms": percentile(self.stream_s, 0.5) * 1000,
            "stream_p99_ms": percentile(self.stream_s, 0.99) * 1000,
            "requests_per_s": requests / self.wall_s,
            # CPU per request of each process, and how busy each was (CPU seconds per wall second)
            **{
                f"{name}_cpu_ms_per_request": seconds / requests * 1000
                for name, seconds in self.cpu_s.items()
            },
            **{f"{name}_cpu_utilisation": seconds / self.wall_s for name, seconds in self.cpu_s.items()},
            **{
                f"{name}_system_cpu_share": self.system_cpu_s[name] / max(seconds, 1e-9)
                for name, seconds in self.cpu_s.items()
            },
        }


async def measure(
    options, worker_port: int, gateway_ports: dict[str, int], key: str, pids: dict[str, dict[str, list[int]]]
) -> dict:
    """`gateway_ports`: the untraced (`gateway`) and traced (`gateway_traced`) gateways' port; `pids`: per
    target, the processes whose CPU is read (`gateway` names the target's own gateway processes)."""
    encode = msgspec.json.encode
    prompt = "Benchmark prompt: say something."
    run = uuid.uuid4().hex[:8]

    def direct_body(index: int) -> bytes:
        return encode(
            {
                "request_id": f"bench-{run}-{index}",
                "tenant_id": "bench",
                "tier": "enterprise",
                "model": MODEL,
                "prompt": prompt,
                "max_tokens": options.tokens,
            }
        )

    gateway_body = encode({"model": MODEL, "prompt": prompt, "max_tokens": options.tokens, "stream": True})

    direct = ("/internal/v1/generate", direct_body, "")
    through = ("/v1/completions", lambda _index: gateway_body, f"authorization: Bearer {key}\r\n")
    targets = [("direct", worker_port, direct)] + [
        (name, port, through) for name, port in gateway_ports.items()
    ]
    warmup = min(options.requests, options.concurrency * 2)
    for _name, port, target in targets:  # warm the key cache and the connections gently first
        await run_round(port, *target, 1, 10)
    for _name, port, target in targets:
        await run_round(port, *target, options.concurrency, warmup)
    totals = {name: RoundTotals() for name, _port, _target in targets}
    stream_s = options.tokens * options.token_interval_ms / 1000
    for _ in range(options.rounds):
        for name, port, target in targets:
            processes = pids[name]
            cpu_before = {process: cpu_seconds(*process_ids) for process, process_ids in processes.items()}
            first, total, seconds = await run_round(
                port, *target, options.concurrency, options.requests, stagger_s=stream_s
            )
            cpu_after = {process: cpu_seconds(*process_ids) for process, process_ids in processes.items()}
            cpu_used = {
                process: (
                    cpu_after[process][0] - cpu_before[process][0],
                    cpu_after[process][1] - cpu_before[process][1],
                )
                for process in processes
            }
            totals[name].add(first, total, seconds, cpu_used)
    return {name: round_totals.summary() for name, round_totals in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", choices=["canned-worker", "gateway"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-url", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--tracing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile", metavar="PATH", help="write the gateway's cProfile stats here (slows it)"
    )
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="concurrent streams")
    parser.add_argument(
        "--gateway-processes",
        type=int,
        default=1,
        help="gateway processes sharing the port (SO_REUSEPORT), as one per core would be deployed",
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests per round and target")
    parser.add_argument("--rounds", type=int, default=2, help="alternating direct/gateway rounds")
    parser.add_argument("--tokens", type=int, default=16, help="canned tokens per completion")
    parser.add_argument("--token-interval-ms", type=float, default=20.0, help="time between canned tokens")
    options = parser.parse_args()
    if options.serve == "canned-worker":
        serve_canned_worker(options.port, options.token_interval_ms)
        return
    if options.serve == "gateway":
        serve_gateway(
            options.port, options.worker_url, options.database_url, options.profile, options.tracing
        )
        return

    with tempfile.TemporaryDirectory(prefix="tollgate-bench-") as data_dir:
        database_url, key = prepare_tenant(data_dir)
        worker_port, gateway_port, traced_port = free_port(), free_port(), free_port()
        me = [sys.executable, "-m", "bench.gateway"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        worker = subprocess.Popen(
            [
                *me,
                "--serve",
                "canned-worker",
                "--port",
                str(worker_port),
                "--token-interval-ms",
                str(options.token_interval_ms),
            ],
            env=env,
        )
        profiling = ["--profile", options.profile] if options.profile else []

        def start_gateways(port: int, tracing: list[str]) -> list[subprocess.Popen]:
            return [
                subprocess.Popen(
                    [
                        *me,
                        "--serve",
                        "gateway",
                        "--port",
                        str(port),
                        "--worker-url",
                        f"http://127.0.0.1:{worker_port}",
                        "--database-url",
                        database_url,
                        *profiling,
                        *tracing,
                    ],
                    env=env,
                )
                for _ in range(options.gateway_processes)
            ]

        gateways = start_gateways(gateway_port, [])
        traced = start_gateways(traced_port, ["--tracing"])
        try:
            wait_ready(worker_port, worker)
            for port, processes in ((gateway_port, gateways), (traced_port, traced)):
                for process in processes:
                    wait_ready(port, process)
            import uvloop

            load_before = os.getloadavg()[0]
            others = {"worker": [worker.pid], "load_generator": [os.getpid()]}
            untraced_pids = {"gateway": [gateway.pid for gateway in gateways], **others}
            pids = {
                "direct": untraced_pids,
                "gateway": untraced_pids,
                "gateway_traced": {"gateway": [process.pid for process in traced], **others},
            }
            ports = {"gateway": gateway_port, "gateway_traced": traced_port}
            summary = uvloop.run(measure(options, worker_port, ports, key, pids))
        finally:
            for process in (*gateways, *traced, worker):
                process.terminate()
                process.wait(timeout=20)
    direct, through, traced_through = summary["direct"], summary["gateway"], summary["gateway_traced"]
    print(
        json.dumps(
            {
                "benchmark": "gateway",
                "worker": "CannedTokenWorker (benchmark-only stand-in, real NDJSON protocol)",
                "admission": "AdmitAllAdmission (benchmark-only)",
                "concurrency": options.concurrency,
                "gateway_processes": options.gateway_processes,
                "requests": options.requests * options.rounds,
                "tokens_per_request": options.tokens,
                "token_interval_ms": options.token_interval_ms,
                "cpus": os.cpu_count(),
                "load_average_1m_before": round(load_before, 2),  # other processes competing for the cores
                "added_latency_p50_ms": round(through["stream_p50_ms"] - direct["stream_p50_ms"], 3),
                "added_latency_p99_ms": round(through["stream_p99_ms"] - direct["stream_p99_ms"], 3),
                "added_first_token_p50_ms": round(
                    through["first_token_p50_ms"] - direct["first_token_p50_ms"], 3
                ),
                "added_first_token_p99_ms": round(
                    through["first_token_p99_ms"] - direct["first_token_p99_ms"], 3
                ),
                "gateway_requests_per_s": round(through["requests_per_s"], 1),
                "gateway_cpu_ms_per_request": round(through["gateway_cpu_ms_per_request"], 3),
                "direct_requests_per_s": round(direct["requests_per_s"], 1),
                # the hot path's cost with tracing off and on (the traced gateway's own rounds)
                "tracing_off": {
                    "gateway_cpu_ms_per_request": round(through["gateway_cpu_ms_per_request"], 3),
                    "added_latency_p50_ms": round(through["stream_p50_ms"] - direct["stream_p50_ms"], 3),
                },
                "tracing_on": {
                    "gateway_cpu_ms_per_request": round(traced_through["gateway_cpu_ms_per_request"], 3),
                    "added_latency_p50_ms": round(
                        traced_through["stream_p50_ms"] - direct["stream_p50_ms"], 3
                    ),
                },
                "direct": {k: round(v, 3) for k, v in direct.items()},
                "gateway": {k: round(v, 3) for k, v in through.items()},
                "gateway_traced": {k: round(v, 3) for k, v in traced_through.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
