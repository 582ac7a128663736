"""Stream processor benchmark on a real broker: `python -m bench.streams` prints one JSON line.

It starts its own single-node broker in a temporary directory, runs the faust processor
(`python -m streams.faust_app`) as a child process, and stops both at the end.

Phase 1, throughput. Grants for a few tenants (two per partition) and `--events` usage events are
produced as fast as a plain idempotent aiokafka producer batches them (acks=all, lingering) before
the processor starts. The fold rate is the usage count over the time between the processor's first
balance record and the balance record whose `applied_offset` covers the last event of every
partition (broker CreateTime of the processor's own records on `ledger.balances`).

Phase 2, lag. With the processor caught up, a paced producer offers usage events at `--rate` per
second for `--duration-s`. Per usage event, lag = CreateTime of its `usage_allocated` record on
`ledger.entries` minus the CreateTime of the source record; p50/p99/max over every event.

Phase 3, the fold alone. `LedgerProcessor.process` runs in this process over the phase-1 records,
in batches of `processor_batch_max` per partition, against a dict: the rate without faust, aiokafka,
the broker or the output producer. The gap to phase 1 is the transport's share.

`--profile PATH` runs the processor under cProfile (stats written to PATH when it stops) and prints
the top functions by cumulative and own time to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from bench._kafka_bench_util import (
    ChildProcess,
    ProducerOptions,
    end_offsets,
    keys_covering_partitions,
    local_broker,
    new_assigned_consumer,
    new_producer,
    partition_of,
    profiled_module_args,
    read_range,
    send_all,
    topic_partitions,
)
from ledger.codec import encode_event
from ledger.events import CreditGranted, UsageRecorded
from streams.faust_app import ProcessorSettings
from streams.processor import BalanceRecord, LedgerProcessor, SourceRecord
from streams.topics import LedgerTopics, ensure_topics, ledger_topic_specs

TENANTS_PER_PARTITION = 2
GRANT_AMOUNT = 10**15  # large enough that no usage in the bench runs into overage
GRANT_EFFECTIVE_AT_MS = 1_600_000_000_000
USAGE_AMOUNT_MAX = 97
MODEL = "tollgate-tiny"

THROUGHPUT_USAGE_EVENTS_DEFAULT = 200_000
OFFERED_RATE_PER_S_DEFAULT = 5_000
OFFERED_DURATION_S_DEFAULT = 20
PACE_TICK_MS = 10
PRODUCE_IN_FLIGHT_MAX = 20_000

WORKER_READY_TIMEOUT_S = 60
FOLD_TIMEOUT_S = 90
LAG_DRAIN_TIMEOUT_S = 30
METADATA_TIMEOUT_S = 15
READ_TIMEOUT_S = 30
PROCESSOR_MODULE = "streams.faust_app"

FOLD_EVENTS_PER_S_TARGET = 20_000
LAG_P99_MS_TARGET = 500

BULK_PRODUCER = ProducerOptions(linger_ms=20, max_batch_size_bytes=512 * 1024)
PACED_PRODUCER = ProducerOptions(linger_ms=1, max_batch_size_bytes=64 * 1024)

_balance_decoder = msgspec.json.Decoder(BalanceRecord)


class _EntryHead(msgspec.Struct):
    """The fields of a `ledger.entries` record the lag needs; the rest is skipped unparsed."""

    type: str
    event_id: str | None = None


_entry_head_decoder = msgspec.json.Decoder(_EntryHead)


# ---------------------------------------------------------------------------------------------- events


def grant_records(tenants: list[str]) -> list[tuple[bytes, bytes]]:
    return [
        (tenant.encode(), encode_event(CreditGranted(
            event_id=f"bench-grant-{tenant}", tenant_id=tenant, grant_id=f"bench-grant-{tenant}",
            amount=GRANT_AMOUNT, effective_at=GRANT_EFFECTIVE_AT_MS,
        )))
        for tenant in tenants
    ]


def usage_record(tenant: str, event_id: str, occurred_at: int, amount: int) -> tuple[bytes, bytes]:
    event = UsageRecorded(
        event_id=event_id, tenant_id=tenant, amount=amount, occurred_at=occurred_at,
        model=MODEL, prompt_tokens=amount, completion_tokens=amount,
    )
    return tenant.encode(), encode_event(event)


def throughput_records(tenants: list[str], count: int, start_ms: int) -> list[tuple[bytes, bytes]]:
    """`count` usage events in time order, spread round-robin over the tenants."""
    return [
        usage_record(tenants[n % len(tenants)], f"bench-usage-{n}", start_ms + n, 1 + n % USAGE_AMOUNT_MAX)
        for n in range(count)
    ]


# ---------------------------------------------------------------------------------------------- balances


@dataclass
class BalanceWatch:
    """Follows `ledger.balances` from its start: per partition, (broker time, applied_offset) in order."""

    partitions: int
    progress: dict[int, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    records_read: int = 0

    def applied(self, partition: int) -> int:
        history = self.progress.get(partition)
        return history[-1][1] if history else -1

    def covers(self, targets: dict[int, int]) -> bool:
        return all(self.applied(partition) >= offset for partition, offset in targets.items())

    def covered_at_ms(self, targets: dict[int, int]) -> int:
        """Broker time of the balance record that completed the coverage of `targets`."""
        return max(next(ts for ts, offset in self.progress[p] if offset >= target) for p, target in targets.items())

    def first_at_ms(self) -> int:
        return min(history[0][0] for history in self.progress.values() if history)

    async def follow(self, bootstrap: str, topic: str, ready: asyncio.Event) -> None:
        consumer = new_assigned_consumer(bootstrap, "tollgate-bench-balances")
        await consumer.start()
        try:
            partitions = await topic_partitions(consumer, topic, METADATA_TIMEOUT_S)
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ready.set()
            while True:
                batches = await consumer.getmany(timeout_ms=100, max_records=10_000)
                for tp, batch in batches.items():
                    for record in batch:
                        self._observe(tp.partition, record.timestamp, _balance_decoder.decode(record.value))
        finally:
            await consumer.stop()

    def _observe(self, partition: int, timestamp_ms: int, balance: BalanceRecord) -> None:
        expected = partition_of(balance.tenant_id.encode(), self.partitions)
        assert partition == expected, f"balance of {balance.tenant_id} on partition {partition}, source on {expected}"
        self.records_read += 1
        history = self.progress[partition]
        if not history or balance.applied_offset > history[-1][1]:
            history.append((timestamp_ms, balance.applied_offset))

    async def wait_covering(self, targets: dict[int, int], worker: ChildProcess, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.covers(targets):
            if not worker.alive():
                raise RuntimeError(f"the processor exited:\n{worker.log_tail()}")
            if time.monotonic() >= deadline:
                behind = {p: (self.applied(p), t) for p, t in targets.items() if self.applied(p) < t}
                raise RuntimeError(f"balances not caught up in {timeout_s}s (applied, target): {behind}")
            await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------------- phases


async def produce_throughput_events(bootstrap: str, topic: str, tenants: list[str], count: int):
    """Grants first (acknowledged), then the usage events; returns (last offsets, usage produce rate)."""
    producer = new_producer(bootstrap, BULK_PRODUCER)
    await producer.start()
    try:
        await send_all(producer, topic, grant_records(tenants), PRODUCE_IN_FLIGHT_MAX)
        records = throughput_records(tenants, count, int(time.time() * 1000) - count)
        started = time.perf_counter()
        last_offsets = await send_all(producer, topic, records, PRODUCE_IN_FLIGHT_MAX)
        elapsed_s = time.perf_counter() - started
    finally:
        await producer.stop()
    return last_offsets, count / elapsed_s


async def offer_paced(bootstrap: str, topic: str, tenants: list[str], rate_per_s: int, duration_s: float):
    """Send `rate_per_s` usage events per second in ticks of PACE_TICK_MS; returns
    ({event id: source CreateTime ms}, last offsets, achieved rate)."""
    per_tick = rate_per_s * PACE_TICK_MS // 1000
    assert per_tick >= 1, f"rate {rate_per_s}/s is below one event per {PACE_TICK_MS} ms tick"
    ticks = int(duration_s * 1000 // PACE_TICK_MS)
    sent_at_ms: dict[str, int] = {}
    futures: list[asyncio.Future] = []
    producer = new_producer(bootstrap, PACED_PRODUCER)
    await producer.start()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for tick in range(ticks):
            delay = started + tick * PACE_TICK_MS / 1000 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now_ms = int(time.time() * 1000)
            for n in range(tick * per_tick, (tick + 1) * per_tick):
                event_id = f"bench-lag-{n}"
                key, value = usage_record(tenants[n % len(tenants)], event_id, now_ms, 1 + n % USAGE_AMOUNT_MAX)
                futures.append(await producer.send(topic, value, key=key, timestamp_ms=now_ms))
                sent_at_ms[event_id] = now_ms
        elapsed_s = loop.time() - started
        results = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    last_offsets: dict[int, int] = {}
    for metadata in results:
        last_offsets[metadata.partition] = max(last_offsets.get(metadata.partition, -1), metadata.offset)
    return sent_at_ms, last_offsets, len(sent_at_ms) / elapsed_s


def lags_ms(entry_records, sent_at_ms: dict[str, int]) -> list[int]:
    lags = []
    for record in entry_records:
        head = _entry_head_decoder.decode(record.value)
        if head.type == "usage_allocated" and head.event_id in sent_at_ms:
            lags.append(record.timestamp - sent_at_ms[head.event_id])
    return lags


def percentile(sorted_values: list[int], fraction: float) -> int:
    assert sorted_values, "percentile of nothing"
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


class _DictState:
    """`StateReader` over a dict, with the write the transports make after publishing."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def items_with_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        return ((k, v) for k, v in list(self.data.items()) if k.startswith(prefix))


def fold_only_rate(records: list[tuple[bytes, bytes]], partitions: int, batch_max: int, topic: str) -> float:
    """Usage events per second through LedgerProcessor.process alone, batched as the faust agent does."""
    by_partition: dict[int, list[SourceRecord]] = defaultdict(list)
    for key, value in records:
        partition = partition_of(key, partitions)
        by_partition[partition].append(SourceRecord(partition, len(by_partition[partition]), key, value, 0))
    state = _DictState()
    processor = LedgerProcessor(state, source_topic=topic)
    started = time.perf_counter()
    for partition, source in by_partition.items():
        for start in range(0, len(source), batch_max):
            output = processor.process(partition, source[start:start + batch_max])
            state.data.update(output.state_writes)
    return len(records) / (time.perf_counter() - started)


def print_profile(path: Path, lines: int) -> None:
    stream = io.StringIO()
    stats = pstats.Stats(str(path), stream=stream)
    stats.sort_stats("cumulative").print_stats(lines)
    stats.sort_stats("tottime").print_stats(lines)
    print(stream.getvalue(), file=sys.stderr)


# ---------------------------------------------------------------------------------------------- main


def processor_env(settings: ProcessorSettings, bootstrap: str, workdir: Path) -> dict[str, str]:
    return {
        "TOLLGATE_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "TOLLGATE_TOPIC_PREFIX": settings.topic_prefix,
        "TOLLGATE_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "TOLLGATE_PROCESSOR_APP_ID": settings.processor_app_id,
        "TOLLGATE_PROCESSOR_DATA_DIR": str(workdir / "faust"),
        "TOLLGATE_SPOOL_PATH": str(workdir / "processor-spool.sqlite3"),
        "TOLLGATE_PROCESSOR_BATCH_MAX": str(settings.processor_batch_max),
        "TOLLGATE_PROCESSOR_BATCH_WAIT_MS": str(settings.processor_batch_wait_ms),
        "TOLLGATE_PROCESSOR_COMMIT_INTERVAL_MS": str(settings.processor_commit_interval_ms),
        "TOLLGATE_PRODUCER_LINGER_MS": str(settings.producer_linger_ms),
        "TOLLGATE_PRODUCER_BATCH_SIZE_BYTES": str(settings.producer_batch_size_bytes),
    }


async def run(arguments: argparse.Namespace, workdir: Path) -> dict:
    # The processor's settings as it will read them, except what the bench sets (broker, names, paths).
    settings = ProcessorSettings(topic_prefix="bench.", processor_app_id="tollgate-bench-ledger")
    topics = LedgerTopics.from_settings(settings)
    partitions = settings.topic_partitions
    tenants = keys_covering_partitions("bench-tenant", partitions, TENANTS_PER_PARTITION)
    with local_broker() as bootstrap:
        await ensure_topics(bootstrap, ledger_topic_specs(settings))
        throughput_offsets, produce_rate = await produce_throughput_events(bootstrap, topics.events, tenants, arguments.events)

        watch = BalanceWatch(partitions)
        watch_ready = asyncio.Event()
        watcher = asyncio.create_task(watch.follow(bootstrap, topics.balances, watch_ready))
        python_args = profiled_module_args(PROCESSOR_MODULE, arguments.profile.resolve()) if arguments.profile else None
        worker = ChildProcess(PROCESSOR_MODULE, processor_env(settings, bootstrap, workdir), workdir / "processor.log", python_args)
        try:
            await asyncio.wait_for(watch_ready.wait(), METADATA_TIMEOUT_S)
            worker_started = time.perf_counter()
            worker.start()
            await watch.wait_covering(throughput_offsets, worker, WORKER_READY_TIMEOUT_S + FOLD_TIMEOUT_S)
            start_to_caught_up_s = time.perf_counter() - worker_started
            fold_span_ms = watch.covered_at_ms(throughput_offsets) - watch.first_at_ms()
            folded_events = arguments.events + len(tenants)

            entries_before = await end_offsets(bootstrap, topics.entries, METADATA_TIMEOUT_S)
            sent_at_ms, lag_offsets, offered_rate = await offer_paced(
                bootstrap, topics.events, tenants, arguments.rate, arguments.duration_s
            )
            await watch.wait_covering(lag_offsets, worker, LAG_DRAIN_TIMEOUT_S)
        finally:
            worker.stop()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        entries_after = await end_offsets(bootstrap, topics.entries, METADATA_TIMEOUT_S)
        entries = await read_range(bootstrap, topics.entries, entries_before, entries_after, READ_TIMEOUT_S)

    lags = sorted(lags_ms(entries, sent_at_ms))
    assert len(lags) == len(sent_at_ms), f"{len(sent_at_ms)} usage events offered, {len(lags)} allocations read"
    fold_rate = folded_events / (fold_span_ms / 1000)
    fold_alone = fold_only_rate(
        grant_records(tenants) + throughput_records(tenants, arguments.events, int(time.time() * 1000)),
        partitions, settings.processor_batch_max, topics.events,
    )
    if arguments.profile:
        print_profile(arguments.profile, arguments.profile_lines)
    lag_p99 = percentile(lags, 0.99)
    return {
        "bench": "streams",
        "partitions": partitions,
        "tenants": len(tenants),
        "usage_events": arguments.events,
        "produce_events_per_s": round(produce_rate),
        "fold_events_per_s": round(fold_rate),
        "fold_span_s": round(fold_span_ms / 1000, 2),
        "processor_start_to_caught_up_s": round(start_to_caught_up_s, 2),
        "fold_only_in_process_events_per_s": round(fold_alone),
        "lag_offered_rate_target_per_s": arguments.rate,
        "lag_offered_rate_achieved_per_s": round(offered_rate),
        "lag_events": len(lags),
        "lag_ms_p50": percentile(lags, 0.50),
        "lag_ms_p99": lag_p99,
        "lag_ms_max": lags[-1],
        "balance_records_read": watch.records_read,
        "profiled": bool(arguments.profile),
        "settings": {
            "processor_batch_max": settings.processor_batch_max,
            "processor_batch_wait_ms": settings.processor_batch_wait_ms,
            "processor_commit_interval_ms": settings.processor_commit_interval_ms,
            "processor_producer_linger_ms": settings.producer_linger_ms,
            "processor_producer_batch_size_bytes": settings.producer_batch_size_bytes,
            "bench_bulk_producer_linger_ms": BULK_PRODUCER.linger_ms,
            "bench_paced_producer_linger_ms": PACED_PRODUCER.linger_ms,
            "pace_tick_ms": PACE_TICK_MS,
        },
        "targets_met": {
            "fold_events_per_s_at_least_20000": fold_rate >= FOLD_EVENTS_PER_S_TARGET,
            "lag_p99_under_500_ms_at_5000_per_s": lag_p99 < LAG_P99_MS_TARGET and arguments.rate >= 5_000,
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=THROUGHPUT_USAGE_EVENTS_DEFAULT, help="usage events pre-produced")
    parser.add_argument("--rate", type=int, default=OFFERED_RATE_PER_S_DEFAULT, help="offered usage events per second")
    parser.add_argument("--duration-s", type=float, default=OFFERED_DURATION_S_DEFAULT, help="how long the rate is offered")
    parser.add_argument("--profile", type=Path, default=None, help="run the processor under cProfile; stats to this file")
    parser.add_argument("--profile-lines", type=int, default=30, help="functions printed per profile listing")
    arguments = parser.parse_args(argv)
    assert arguments.events >= 1 and arguments.rate >= 1 and arguments.duration_s > 0, "counts must be positive"
    with tempfile.TemporaryDirectory(prefix="tollgate-bench-streams-") as workdir:
        result = asyncio.run(run(arguments, Path(workdir)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
