"""Audit replay benchmark on a real broker: `python -m bench.replay` prints one JSON line.

It starts its own single-node broker in a temporary directory, produces grants for `--tenants` tenants
and `--events` usage events spread round-robin over them onto `ledger.events` (`bench.replay.` topics,
the default partition count), then runs `tollgate ledger replay` as a child process and measures:

- `replay_events_per_s`: records replayed over the child's whole run (interpreter start, imports, reading
  every partition from the broker, the fold, the balance table printed);
- `replay_peak_rss_mib`: the largest sum of the resident set sizes of the child and its worker processes,
  sampled every `RSS_SAMPLE_INTERVAL_S` (Linux /proc), and the largest of any one of them.

The replay's own count of records must equal what was produced, and nothing may be rejected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._kafka_bench_util import (
    REPO_ROOT,
    ProducerOptions,
    local_broker,
    new_producer,
    send_all,
    send_all_batched,
)
from bench.streams import grant_records, rss_usage_records
from streams.settings import StreamSettings
from streams.topics import LedgerTopics, ensure_topics, ledger_topic_specs

EVENTS_DEFAULT = 2_000_000
TENANTS_DEFAULT = 1_000
TOPIC_PREFIX = "bench.replay."
PRODUCE_IN_FLIGHT_MAX = 50_000
BULK_PRODUCER = ProducerOptions(linger_ms=20, max_batch_size_bytes=512 * 1024)
RSS_SAMPLE_INTERVAL_S = 0.1
REPLAY_TIMEOUT_S = 300
EVENTS_PER_S_TARGET = 100_000
SUMMARY_LINE = re.compile(rb"(\d+) records, (\d+) rejected")


def process_tree(root: int) -> list[int]:
    """`root` and every live descendant of it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(entry))
    tree, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        tree.append(pid)
        frontier.extend(children.get(pid, ()))
    return tree


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # gone meanwhile, or a zombie


async def produce(bootstrap: str, topic: str, partitions: int, tenant_count: int, events: int) -> float:
    """Grants, then the usage events; returns the usage produce rate."""
    tenants = [f"bench-replay-tenant-{n}" for n in range(tenant_count)]
    producer = new_producer(bootstrap, BULK_PRODUCER)
    await producer.start()
    try:
        await send_all(producer, topic, grant_records(tenants), PRODUCE_IN_FLIGHT_MAX)
        started = time.perf_counter()
        start_ms = int(time.time() * 1000) - events // tenant_count - 1
        await send_all_batched(
            producer, topic, partitions, rss_usage_records(tenants, events, start_ms), PRODUCE_IN_FLIGHT_MAX
        )
        return events / (time.perf_counter() - started)
    finally:
        await producer.stop()


def run_replay(env: dict[str, str], log_path: Path) -> tuple[float, int, int, bytes]:
    """`tollgate ledger replay` as a child: (wall seconds, peak tree RSS, peak single RSS, its output)."""
    peak_tree = peak_single = 0
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-m", "tollgate", "ledger", "replay"],
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            while child.poll() is None:
                if time.perf_counter() - started > REPLAY_TIMEOUT_S:
                    raise RuntimeError(f"the replay did not finish within {REPLAY_TIMEOUT_S}s")
                sizes = [rss_bytes(pid) for pid in process_tree(child.pid)]
                peak_tree, peak_single = max(peak_tree, sum(sizes)), max(peak_single, *sizes)
                time.sleep(RSS_SAMPLE_INTERVAL_S)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        wall_s = time.perf_counter() - started
    output = log_path.read_bytes()
    if child.returncode != 0:
        raise RuntimeError(
            f"the replay exited {child.returncode}:\n{output[-3000:].decode(errors='replace')}"
        )
    return wall_s, peak_tree, peak_single, output


async def run(arguments: argparse.Namespace, workdir: Path) -> dict:
    settings = StreamSettings(topic_prefix=TOPIC_PREFIX)
    topics = LedgerTopics.from_settings(settings)
    with local_broker() as broker:
        await ensure_topics(broker.bootstrap, ledger_topic_specs(settings))
        produce_rate = await produce(
            broker.bootstrap, topics.events, settings.topic_partitions, arguments.tenants, arguments.events
        )
        env = {
            "TOLLGATE_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "TOLLGATE_TOPIC_PREFIX": TOPIC_PREFIX,
            "TOLLGATE_TOPIC_PARTITIONS": str(settings.topic_partitions),
            "COLUMNS": "120",
        }
        wall_s, peak_tree, peak_single, output = run_replay(env, workdir / "replay.log")
    summary = SUMMARY_LINE.search(output)
    assert summary is not None, (
        f"no summary line in the replay's output:\n{output[-2000:].decode(errors='replace')}"
    )
    records, rejected = int(summary[1]), int(summary[2])
    produced = arguments.events + arguments.tenants
    assert records == produced and rejected == 0, (
        f"replayed {records} records ({rejected} rejected) of {produced}"
    )
    rate = records / wall_s
    return {
        "bench": "replay",
        "partitions": settings.topic_partitions,
        "tenants": arguments.tenants,
        "records": records,
        "produce_events_per_s": round(produce_rate),
        "replay_wall_s": round(wall_s, 2),
        "replay_events_per_s": round(rate),
        "replay_peak_rss_mib": round(peak_tree / 2**20, 1),
        "replay_peak_rss_one_process_mib": round(peak_single / 2**20, 1),
        "cpus": os.cpu_count(),
        "targets_met": {"replay_events_per_s_at_least_100000": rate >= EVENTS_PER_S_TARGET},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=EVENTS_DEFAULT, help="usage events on ledger.events")
    parser.add_argument("--tenants", type=int, default=TENANTS_DEFAULT, help="tenants they are spread over")
    arguments = parser.parse_args(argv)
    assert arguments.events >= 1 and arguments.tenants >= 1, "counts must be positive"
    with tempfile.TemporaryDirectory(prefix="tollgate-bench-replay-") as workdir:
        result = asyncio.run(run(arguments, Path(workdir)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
