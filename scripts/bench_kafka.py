"""Benchmark of the local broker and the EventProducer; prints one JSON line.

    .venv/bin/python -m scripts.bench_kafka [--events 20000] [--batch 500]

Measures: broker cold start (fresh directory: format + start), clean stop, warm restart (same data),
restart after SIGKILL; acknowledged publish throughput (publish_many batches) and single-publish
latency; spool throughput while the broker is away, and the time to drain that spool once it is back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from ledger.events import UsageRecorded
from scripts import kafka_local
from streams.producer import EventProducer
from streams.settings import StreamSettings
from streams.topics import ensure_topics, ledger_topic_specs

SINGLE_PUBLISH_SAMPLES = 300


def _events(count: int, run: str) -> list[UsageRecorded]:
    return [
        UsageRecorded(
            event_id=f"{run}-{index}",
            tenant_id=f"tenant-{index % 64}",
            amount=index,
            occurred_at=1_700_000_000_000 + index,
            model="bench",
        )
        for index in range(count)
    ]


def _timed(function, *arguments) -> float:
    started = time.perf_counter()
    function(*arguments)
    return time.perf_counter() - started


async def _bench_producer(directory: Path, bootstrap: str, event_count: int, batch_size: int) -> dict:
    settings = StreamSettings(
        kafka_bootstrap_servers=bootstrap,
        topic_prefix="bench.",
        spool_path=directory / "spool.sqlite3",
        publish_ack_timeout_ms=1_000,
        resend_backoff_max_ms=500,
    )
    await ensure_topics(bootstrap, ledger_topic_specs(settings))
    results: dict = {}
    async with EventProducer(settings) as producer:
        await producer.publish_many(_events(100, "warmup"))
        events = _events(event_count, "acked")
        started = time.perf_counter()
        for start in range(0, len(events), batch_size):
            receipts = await producer.publish_many(events[start : start + batch_size])
            assert not any(receipt.spooled for receipt in receipts)
        results["acked_publish_events_per_s"] = round(event_count / (time.perf_counter() - started))

        latencies_ms = []
        for event in _events(SINGLE_PUBLISH_SAMPLES, "single"):
            started = time.perf_counter()
            await producer.publish(event)
            latencies_ms.append((time.perf_counter() - started) * 1000)
        results["single_publish_latency_p50_ms"] = round(statistics.median(latencies_ms), 2)
        results["single_publish_latency_p99_ms"] = round(statistics.quantiles(latencies_ms, n=100)[98], 2)

        kafka_local.kill(directory / "broker")
        events = _events(event_count, "spooled")
        await producer.publish(events[0])  # times out once (publish_ack_timeout_ms), then spooling mode
        started = time.perf_counter()
        for start in range(1, len(events), batch_size):
            await producer.publish_many(events[start : start + batch_size])
        results["spool_publish_events_per_s"] = round((event_count - 1) / (time.perf_counter() - started))
        kafka_local.start(directory / "broker")
        started = time.perf_counter()
        drained = await producer.wait_until_drained(120_000)
        assert drained, "the spool did not drain within 120 s"
        results["spool_drain_after_restart_s"] = round(time.perf_counter() - started, 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    arguments = parser.parse_args()
    kafka_local.fetch_jars()
    with tempfile.TemporaryDirectory(prefix="tollgate-kafka-bench-") as temporary:
        directory = Path(temporary)
        broker_dir = directory / "broker"
        results = {"kafka_version": kafka_local.KAFKA_VERSION}
        started = time.perf_counter()
        address = kafka_local.start(broker_dir)
        results["broker_cold_start_s"] = round(time.perf_counter() - started, 2)
        results["broker_stop_s"] = round(_timed(kafka_local.stop, broker_dir), 2)
        results["broker_warm_restart_s"] = round(_timed(kafka_local.start, broker_dir), 2)
        kafka_local.kill(broker_dir)
        results["broker_restart_after_kill_s"] = round(_timed(kafka_local.start, broker_dir), 2)
        try:
            results.update(
                asyncio.run(_bench_producer(directory, address.bootstrap, arguments.events, arguments.batch))
            )
        finally:
            kafka_local.stop(broker_dir)
    results["events"] = arguments.events
    results["batch"] = arguments.batch
    print(json.dumps(results))


if __name__ == "__main__":
    main()
