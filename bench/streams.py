"""Stream processor benchmark on a real broker: `python -m bench.streams` prints one JSON line.

It starts its own single-node broker in a temporary directory, runs the stream processor
(`--engine batch`, the default: `python -m streams.batch_processor`; `--engine faust`: `python -m
streams.faust_app`) as a child process per phase, and stops everything at the end. Each
phase has its own topics (`bench.fold.*`, `bench.lag.*`) and consumer group, and a deadline, so the
run is bounded (about two minutes with the defaults) whether or not the processor keeps up.

Fold phase. Grants for twelve tenants (two per partition) and `--events` usage events are produced as
fast as a plain idempotent aiokafka producer batches them (acks=all, lingering) before the processor
starts (`produce_events_per_s`). The fold rate is the events folded over the time between the
processor's first balance record and the balance record whose `applied_offset` covers the last event
of every partition (broker CreateTime of the processor's records on `ledger.balances`). If that has
not happened within `--fold-deadline-s`, the rate is what was folded by then (`fold_caught_up`: false).
Beside it: the CPU seconds of the processor, the broker and this process while folding
(`processor_cpu_us_per_event`, and `processor_one_core_events_per_s`, the rate one uncontended core
would give at that cost), `LedgerProcessor.process` alone over the same records in this process
(`fold_only_in_process_events_per_s`: no faust, no broker), and a plain aiokafka consumer reading the
same records (`plain_aiokafka_read_cpu_us_per_event`).

Lag phase. A fresh processor, caught up on the grants, is offered usage events at `--rate` per second
for `--duration-s` by a paced producer (one burst per 10 ms tick). Per usage event, lag = CreateTime
of its `usage_allocated` record on `ledger.entries` (set by the processor's producer) minus the
CreateTime of the source record. Events not folded within `--drain-deadline-s` after the last one was
offered count as later than every folded one: a percentile that falls among them is null.

RSS phase (`--phases ...,rss`, batch engine). Grants for `--rss-tenants` tenants and the largest of
`--rss-events` usage events (spread round-robin over them) are produced first; then the processor folds
them, and its resident set size (VmRSS, /proc) is read when its committed offsets cover each count of
`--rss-events` (1M and 5M by default): state that grows with traffic in RAM shows as growth between
the two (`rss_growth`, target within 20%). `rss_fold_events_per_s` is the fold rate between the first
and the last count (10,000 tenants: a batch touches thousands of tenants, so the processor fetches up to
`RSS_PROCESSOR_BATCH_MAX` records a batch in this phase).

`--profile PATH` runs the fold phase's processor under cProfile (stats to PATH when it stops) and
prints own time by module group, then the top functions, to stderr. Timings under the profiler are
several times slower; use it for shares, not rates.

The processor reads its settings from the environment (TOLLGATE_PROCESSOR_BATCH_MAX, ...,
TOLLGATE_PROCESSOR_CHANGELOG_LINGER_MS for faust's changelog producer); the values used are in `settings`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import GroupCoordinatorNotAvailableError

from bench._kafka_bench_util import (
    ChildProcess,
    LocalBroker,
    ProducerOptions,
    cpu_seconds,
    end_offsets,
    keys_covering_partitions,
    local_broker,
    new_assigned_consumer,
    new_producer,
    partition_of,
    profiled_module_args,
    read_range,
    send_all,
    send_all_batched,
    topic_partitions,
)
from ledger.codec import encode_event
from ledger.events import CreditGranted, UsageRecorded
from streams.batch_processor import READY_LOG_LINE, consumer_group
from streams.processor import LedgerProcessor
from streams.processor_settings import ProcessorSettings
from streams.records import BalanceRecord, LogRecord
from streams.replay import DictState
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
FOLD_DEADLINE_S_DEFAULT = 45
LAG_DRAIN_DEADLINE_S_DEFAULT = 15
METADATA_TIMEOUT_S = 15
READ_TIMEOUT_S = 30
WAIT_POLL_INTERVAL_S = 0.05
ENGINE_MODULES = {
    "batch": "streams.batch_processor",
    "faust": "streams.faust_app",
}  # tollgate streams --engine

FOLD_EVENTS_PER_S_TARGET = 20_000
LAG_P99_MS_TARGET = 500

PHASES = ("fold", "lag", "rss")
RSS_TENANTS_DEFAULT = 10_000
RSS_EVENTS_DEFAULT = (1_000_000, 5_000_000)  # RSS read when the processor has folded each count
RSS_DEADLINE_S_DEFAULT = 900
# The RSS phase's processor fetches up to this many records a batch (TOLLGATE_PROCESSOR_BATCH_MAX): with
# 10,000 tenants a batch of the default 2,000 touches a new tenant per record, and each touched tenant
# costs an account record and a balance; 20,000 folds about two events per tenant per batch.
RSS_PROCESSOR_BATCH_MAX = 20_000
RSS_POLL_INTERVAL_S = 0.5
RSS_GROWTH_TARGET = 1.20  # RSS after the last count within 20% of the RSS after the first
RSS_PRODUCE_CHUNK_EVENTS = 50_000  # usage events built at a time: 5M records are never held at once

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
        (
            tenant.encode(),
            encode_event(
                CreditGranted(
                    event_id=f"bench-grant-{tenant}",
                    tenant_id=tenant,
                    grant_id=f"bench-grant-{tenant}",
                    amount=GRANT_AMOUNT,
                    effective_at=GRANT_EFFECTIVE_AT_MS,
                )
            ),
        )
        for tenant in tenants
    ]


def usage_record(tenant: str, event_id: str, occurred_at: int, amount: int) -> tuple[bytes, bytes]:
    event = UsageRecorded(
        event_id=event_id,
        tenant_id=tenant,
        amount=amount,
        occurred_at=occurred_at,
        model=MODEL,
        prompt_tokens=amount,
        completion_tokens=amount,
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
        return max(
            next(ts for ts, offset in self.progress[p] if offset >= target) for p, target in targets.items()
        )

    def last_at_ms(self) -> int:
        return max(history[-1][0] for history in self.progress.values() if history)

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
        assert partition == expected, (
            f"balance of {balance.tenant_id} on partition {partition}, source on {expected}"
        )
        self.records_read += 1
        history = self.progress[partition]
        if not history or balance.applied_offset > history[-1][1]:
            history.append((timestamp_ms, balance.applied_offset))

    async def wait_first_record(self, worker: ChildProcess, timeout_s: float) -> None:
        await self.wait_covering(
            {partition: 0 for partition in range(self.partitions)}, worker, timeout_s, any_partition=True
        )

    async def wait_covering(
        self,
        targets: dict[int, int],
        worker: ChildProcess,
        timeout_s: float,
        *,
        any_partition: bool = False,
        raise_on_timeout: bool = True,
    ) -> bool:
        """Wait until the balances cover `targets` (or any balance arrived); False on timeout when allowed."""
        deadline = time.monotonic() + timeout_s
        while not (self.records_read > 0 if any_partition else self.covers(targets)):
            if not worker.alive():
                raise RuntimeError(f"the processor exited:\n{worker.log_tail()}")
            if time.monotonic() >= deadline:
                if not raise_on_timeout:
                    return False
                behind = {p: (self.applied(p), t) for p, t in targets.items() if self.applied(p) < t}
                raise RuntimeError(f"balances not caught up in {timeout_s}s (applied, target): {behind}")
            await asyncio.sleep(WAIT_POLL_INTERVAL_S)
        return True


class CpuMeter:
    """CPU seconds each named process (and this one) used since the meter was made."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self._start = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self._start["bench"] = time.process_time()

    def used(self) -> dict[str, float]:
        now = {name: cpu_seconds(pid) for name, pid in self._pids.items()}
        now["bench"] = time.process_time()
        return {name: now[name] - self._start[name] for name in now}


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
                key, value = usage_record(
                    tenants[n % len(tenants)], event_id, now_ms, 1 + n % USAGE_AMOUNT_MAX
                )
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


def percentile(folded_lags_sorted: list[int], unfolded: int, fraction: float) -> int | None:
    """The lag below which `fraction` of all offered events fall, counting an event not folded by the
    drain deadline as later than every folded one; None when the percentile falls among those."""
    index = int(fraction * (len(folded_lags_sorted) + unfolded))
    return folded_lags_sorted[index] if index < len(folded_lags_sorted) else None


def fold_only_rate(records: list[tuple[bytes, bytes]], partitions: int, batch_max: int, topic: str) -> float:
    """Usage events per second through LedgerProcessor.process alone, batched as the faust agent does."""
    by_partition: dict[int, list[LogRecord]] = defaultdict(list)
    for key, value in records:
        partition = partition_of(key, partitions)
        by_partition[partition].append(
            LogRecord(topic, partition, len(by_partition[partition]), key, value, 0)
        )
    state = DictState()
    processor = LedgerProcessor(state, source_topic=topic)
    started = time.perf_counter()
    for partition, source in by_partition.items():
        for start in range(0, len(source), batch_max):
            output = processor.process(partition, source[start : start + batch_max])
            state.write_all(output.state_writes)
    return len(records) / (time.perf_counter() - started)


PROFILE_GROUPS = (  # (group, path fragment), first match wins
    ("fold: ledger + streams.processor", ("/ledger/", "/streams/processor.py")),
    (
        "glue: engine + producer + spool",
        ("/streams/faust_app.py", "/streams/batch_processor.py", "/streams/producer.py", "/streams/spool.py"),
    ),
    (
        "faust + mode (stream, consumer, table, changelog)",
        ("/faust/", "/mode/", "/venusian/", "/yarl/", "/croniter/"),
    ),
    ("aiokafka client (protocol, accumulator, sender, fetcher)", ("/aiokafka/",)),
    ("msgspec / json", ("msgspec",)),
    ("asyncio event loop", ("/asyncio/", "selectors.py")),
)


def profile_groups(stats: pstats.Stats) -> dict[str, float]:
    """Own time per group of modules, in seconds; socket syscalls and epoll waits apart."""
    groups: dict[str, float] = defaultdict(float)
    for (path, _line, function), (_calls, _primitive, own_s, _cumulative, _callers) in stats.stats.items():
        if "socket" in function and ("send" in function or "recv" in function):
            groups["socket send/recv syscalls"] += own_s
        elif "poll" in function and "epoll" in function:
            groups["epoll wait (idle)"] += own_s
        else:
            name = next(
                (group for group, parts in PROFILE_GROUPS if any(part in path for part in parts)), "other"
            )
            groups[name] += own_s
    return dict(sorted(groups.items(), key=lambda item: -item[1]))


def print_profile(path: Path, lines: int) -> None:
    stream = io.StringIO()
    stats = pstats.Stats(str(path), stream=stream)
    print("own time by group (s):", file=stream)
    for group, seconds in profile_groups(stats).items():
        print(f"  {seconds:8.2f}  {group}", file=stream)
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


@contextlib.asynccontextmanager
async def processor_running(
    broker: LocalBroker,
    settings: ProcessorSettings,
    workdir: Path,
    module: str,
    python_args: list[str] | None,
) -> AsyncIterator[tuple[ChildProcess, BalanceWatch]]:
    """The processor as a child process, with a watch on its balances; both stopped at the end."""
    topics = LedgerTopics.from_settings(settings)
    watch = BalanceWatch(settings.topic_partitions)
    watch_ready = asyncio.Event()
    watcher = asyncio.create_task(watch.follow(broker.bootstrap, topics.balances, watch_ready))
    env = processor_env(settings, broker.bootstrap, workdir)
    worker = ChildProcess(module, env, workdir / f"{settings.processor_app_id}.log", python_args)
    try:
        await asyncio.wait_for(watch_ready.wait(), METADATA_TIMEOUT_S)
        worker.start()
        yield worker, watch
    finally:
        worker.stop()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


def phase_settings(phase: str) -> ProcessorSettings:
    """The processor's settings as it will read them (env TOLLGATE_*), with the phase's own topics and
    group."""
    return ProcessorSettings(topic_prefix=f"bench.{phase}.", processor_app_id=f"tollgate-bench-{phase}")


async def measure_fold(broker: LocalBroker, arguments: argparse.Namespace, workdir: Path) -> dict:
    settings = phase_settings("fold")
    topics = LedgerTopics.from_settings(settings)
    tenants = keys_covering_partitions("bench-tenant", settings.topic_partitions, TENANTS_PER_PARTITION)
    await ensure_topics(broker.bootstrap, ledger_topic_specs(settings))
    last_offsets, produce_rate = await produce_throughput_events(
        broker.bootstrap, topics.events, tenants, arguments.events
    )
    module = ENGINE_MODULES[arguments.engine]
    python_args = profiled_module_args(module, arguments.profile.resolve()) if arguments.profile else None
    started = time.perf_counter()
    async with processor_running(broker, settings, workdir, module, python_args) as (worker, watch):
        await watch.wait_first_record(worker, WORKER_READY_TIMEOUT_S)
        cpu = CpuMeter({"processor": worker.pid, "broker": broker.pid})
        caught_up = await watch.wait_covering(
            last_offsets, worker, arguments.fold_deadline_s, raise_on_timeout=False
        )
        cpu_s = cpu.used()
        start_to_end_s = time.perf_counter() - started
    folded = sum(min(watch.applied(p), last) + 1 for p, last in last_offsets.items())
    span_ms = (watch.covered_at_ms(last_offsets) if caught_up else watch.last_at_ms()) - watch.first_at_ms()
    fold_rate = folded / (span_ms / 1000)
    read_cpu_started = time.process_time()
    source = await read_range(
        broker.bootstrap, topics.events, {}, {p: last + 1 for p, last in last_offsets.items()}, READ_TIMEOUT_S
    )
    read_cpu_us_per_event = (time.process_time() - read_cpu_started) * 1e6 / len(source)
    fold_alone = fold_only_rate(
        grant_records(tenants) + throughput_records(tenants, arguments.events, int(time.time() * 1000)),
        settings.topic_partitions,
        settings.processor_batch_max,
        topics.events,
    )
    return {
        "partitions": settings.topic_partitions,
        "tenants": len(tenants),
        "usage_events": arguments.events,
        "produce_events_per_s": round(produce_rate),
        "fold_events_per_s": round(fold_rate),
        "fold_caught_up": caught_up,
        "fold_events_folded": folded,
        "fold_span_s": round(span_ms / 1000, 2),
        "fold_processor_start_to_end_s": round(start_to_end_s, 2),
        "fold_balance_records": watch.records_read,
        "fold_cpu_s": {name: round(seconds, 2) for name, seconds in cpu_s.items()},
        "processor_cpu_us_per_event": round(cpu_s["processor"] * 1e6 / folded, 1),
        "processor_one_core_events_per_s": round(folded / cpu_s["processor"]),
        "fold_only_in_process_events_per_s": round(fold_alone),
        "plain_aiokafka_read_cpu_us_per_event": round(read_cpu_us_per_event, 1),
        "settings": settings_used(settings),
    }


async def measure_lag(broker: LocalBroker, arguments: argparse.Namespace, workdir: Path) -> dict:
    settings = phase_settings("lag")
    topics = LedgerTopics.from_settings(settings)
    tenants = keys_covering_partitions("bench-tenant", settings.topic_partitions, TENANTS_PER_PARTITION)
    await ensure_topics(broker.bootstrap, ledger_topic_specs(settings))
    producer = new_producer(broker.bootstrap, BULK_PRODUCER)
    await producer.start()
    try:
        grant_offsets = await send_all(producer, topics.events, grant_records(tenants), PRODUCE_IN_FLIGHT_MAX)
    finally:
        await producer.stop()
    async with processor_running(broker, settings, workdir, ENGINE_MODULES[arguments.engine], None) as (
        worker,
        watch,
    ):
        await watch.wait_covering(grant_offsets, worker, WORKER_READY_TIMEOUT_S)  # started and caught up
        cpu = CpuMeter({"processor": worker.pid, "broker": broker.pid})
        sent_at_ms, last_offsets, offered_rate = await offer_paced(
            broker.bootstrap, topics.events, tenants, arguments.rate, arguments.duration_s
        )
        cpu_s = cpu.used()
        drained = await watch.wait_covering(
            last_offsets, worker, arguments.drain_deadline_s, raise_on_timeout=False
        )
    entries_end = await end_offsets(broker.bootstrap, topics.entries, METADATA_TIMEOUT_S)
    entries = await read_range(broker.bootstrap, topics.entries, {}, entries_end, READ_TIMEOUT_S)
    lags = sorted(lags_ms(entries, sent_at_ms))
    unfolded = len(sent_at_ms) - len(lags)
    assert unfolded >= 0, f"{len(lags)} allocations read for {len(sent_at_ms)} usage events offered"
    assert drained == (unfolded == 0), f"drained={drained} but {unfolded} usage events have no allocation"
    return {
        "lag_offered_rate_target_per_s": arguments.rate,
        "lag_offered_rate_achieved_per_s": round(offered_rate),
        "lag_offered_s": arguments.duration_s,
        "lag_events": len(sent_at_ms),
        "lag_events_unfolded_after_drain": unfolded,
        "lag_drain_deadline_s": arguments.drain_deadline_s,
        "lag_ms_p50": percentile(lags, unfolded, 0.50),
        "lag_ms_p99": percentile(lags, unfolded, 0.99),
        "lag_ms_max": lags[-1] if lags and not unfolded else None,
        "lag_ms_max_folded": lags[-1] if lags else None,
        "lag_cpu_s": {name: round(seconds, 2) for name, seconds in cpu_s.items()},
        "lag_processor_core_share": round(cpu_s["processor"] / arguments.duration_s, 2),
    }


def rss_bytes(pid: int) -> tuple[int, int]:
    """(resident set size, its peak) of a live process, in bytes (Linux /proc)."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def rss_usage_records(tenants: list[str], count: int, start_ms: int):
    """`count` usage events in time order, round-robin over the tenants, built a chunk at a time."""
    for chunk_start in range(0, count, RSS_PRODUCE_CHUNK_EVENTS):
        yield from (
            usage_record(
                tenants[n % len(tenants)],
                f"bench-rss-{n}",
                start_ms + n // len(tenants),
                1 + n % USAGE_AMOUNT_MAX,
            )
            for n in range(chunk_start, min(count, chunk_start + RSS_PRODUCE_CHUNK_EVENTS))
        )


async def committed_total(admin: AIOKafkaAdminClient, group: str) -> int:
    """The sum over partitions of the group's committed offsets (records folded and recorded); 0 while
    the group has no coordinator yet (the processor is still joining)."""
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    except GroupCoordinatorNotAvailableError:
        return 0
    return sum(metadata.offset for metadata in offsets.values() if metadata.offset > 0)


async def measure_rss(broker: LocalBroker, arguments: argparse.Namespace, workdir: Path) -> dict:
    assert arguments.engine == "batch", "the RSS phase follows the batch engine's committed offsets"
    settings = phase_settings("rss").model_copy(update={"processor_batch_max": RSS_PROCESSOR_BATCH_MAX})
    topics = LedgerTopics.from_settings(settings)
    per_partition = -(-arguments.rss_tenants // settings.topic_partitions)
    tenants = keys_covering_partitions("bench-rss-tenant", settings.topic_partitions, per_partition)
    counts = sorted(arguments.rss_events)
    await ensure_topics(broker.bootstrap, ledger_topic_specs(settings))
    producer = new_producer(broker.bootstrap, BULK_PRODUCER)
    await producer.start()
    try:
        await send_all(producer, topics.events, grant_records(tenants), PRODUCE_IN_FLIGHT_MAX)
        started = time.perf_counter()
        start_ms = int(time.time() * 1000) - counts[-1] // len(tenants) - 1
        await send_all_batched(
            producer,
            topics.events,
            settings.topic_partitions,
            rss_usage_records(tenants, counts[-1], start_ms),
            PRODUCE_IN_FLIGHT_MAX,
        )
        produce_rate = counts[-1] / (time.perf_counter() - started)
    finally:
        await producer.stop()
    env = processor_env(settings, broker.bootstrap, workdir)
    worker = ChildProcess(ENGINE_MODULES["batch"], env, workdir / f"{settings.processor_app_id}.log")
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    readings: list[dict] = []
    try:
        worker.start()
        await worker.wait_for_log(READY_LOG_LINE, WORKER_READY_TIMEOUT_S)
        deadline = time.monotonic() + arguments.rss_deadline_s
        pending = list(counts)
        while pending:
            if not worker.alive():
                raise RuntimeError(f"the processor exited:\n{worker.log_tail()}")
            if time.monotonic() >= deadline:
                break
            folded = await committed_total(admin, consumer_group(settings)) - len(tenants)
            while pending and folded >= pending[0]:
                rss, peak = rss_bytes(worker.pid)
                readings.append(
                    {
                        "events": pending.pop(0),
                        "folded": folded,
                        "at_s": time.monotonic(),
                        "rss": rss,
                        "peak": peak,
                    }
                )
            await asyncio.sleep(RSS_POLL_INTERVAL_S)
        last_folded = await committed_total(admin, consumer_group(settings)) - len(tenants)
        last_rss = rss_bytes(worker.pid)[0] if worker.alive() else None
    finally:
        worker.stop()
        await admin.close()
    first, last = (readings[0], readings[-1]) if readings else (None, None)
    complete = len(readings) == len(counts)
    growth = last["rss"] / first["rss"] if complete else None
    rate = (
        (last["folded"] - first["folded"]) / (last["at_s"] - first["at_s"])
        if complete and len(counts) > 1
        else None
    )
    return {
        "rss_tenants": len(tenants),
        "rss_produce_events_per_s": round(produce_rate),
        "rss_complete": complete,
        "rss_mib_after_events": {str(r["events"]): round(r["rss"] / 2**20, 1) for r in readings},
        "rss_peak_mib_after_events": {str(r["events"]): round(r["peak"] / 2**20, 1) for r in readings},
        "rss_events_folded_at_reading": {str(r["events"]): r["folded"] for r in readings},
        "rss_growth": round(growth, 3) if growth is not None else None,
        "rss_events_folded_at_end": last_folded,  # at the last count, or at the deadline when incomplete
        "rss_mib_at_end": round(last_rss / 2**20, 1) if last_rss is not None else None,
        "rss_fold_events_per_s": round(rate) if rate is not None else None,
        "rss_processor_batch_max": settings.processor_batch_max,
    }


def settings_used(settings: ProcessorSettings) -> dict:
    return {
        "faust_changelog_producer_linger_ms": settings.processor_changelog_linger_ms,
        "faust_changelog_producer_max_batch_size_bytes": settings.processor_changelog_batch_size_bytes,
        "processor_batch_max": settings.processor_batch_max,
        "processor_batch_wait_ms": settings.processor_batch_wait_ms,
        "processor_commit_interval_ms": settings.processor_commit_interval_ms,
        "processor_stream_buffer_max": settings.processor_stream_buffer_max,
        "processor_producer_linger_ms": settings.producer_linger_ms,
        "processor_producer_batch_size_bytes": settings.producer_batch_size_bytes,
        "bench_bulk_producer_linger_ms": BULK_PRODUCER.linger_ms,
        "bench_paced_producer_linger_ms": PACED_PRODUCER.linger_ms,
        "pace_tick_ms": PACE_TICK_MS,
    }


async def run(arguments: argparse.Namespace, workdir: Path) -> dict:
    fold = lag = rss = {}
    with local_broker() as broker:
        if "fold" in arguments.phases:
            fold = await measure_fold(broker, arguments, workdir)
        if "lag" in arguments.phases:
            lag = await measure_lag(broker, arguments, workdir)
        if "rss" in arguments.phases:
            rss = await measure_rss(broker, arguments, workdir)
    if arguments.profile:
        print_profile(arguments.profile, arguments.profile_lines)
    targets = {}
    if fold:
        targets["fold_events_per_s_at_least_20000"] = fold["fold_events_per_s"] >= FOLD_EVENTS_PER_S_TARGET
    if lag:
        lag_p99 = lag["lag_ms_p99"]
        targets["lag_p99_under_500_ms_at_5000_per_s"] = (
            lag_p99 is not None
            and lag_p99 < LAG_P99_MS_TARGET
            and lag["lag_offered_rate_achieved_per_s"] >= OFFERED_RATE_PER_S_DEFAULT
        )
    if rss:
        targets["rss_growth_within_20_percent"] = (
            rss["rss_growth"] is not None and rss["rss_growth"] <= RSS_GROWTH_TARGET
        )
    return {
        "bench": "streams",
        "engine": arguments.engine,
        "phases": list(arguments.phases),
        **fold,
        **lag,
        **rss,
        "profiled": bool(arguments.profile),
        "targets_met": targets,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--engine",
        choices=sorted(ENGINE_MODULES),
        default="batch",
        help="the processor engine (tollgate streams --engine): batch (default) or faust",
    )
    parser.add_argument(
        "--events", type=int, default=THROUGHPUT_USAGE_EVENTS_DEFAULT, help="usage events pre-produced"
    )
    parser.add_argument(
        "--rate", type=int, default=OFFERED_RATE_PER_S_DEFAULT, help="offered usage events per second"
    )
    parser.add_argument(
        "--duration-s", type=float, default=OFFERED_DURATION_S_DEFAULT, help="how long the rate is offered"
    )
    parser.add_argument(
        "--fold-deadline-s",
        type=float,
        default=FOLD_DEADLINE_S_DEFAULT,
        help="stop the fold phase after this long and report the rate so far",
    )
    parser.add_argument(
        "--drain-deadline-s",
        type=float,
        default=LAG_DRAIN_DEADLINE_S_DEFAULT,
        help="how long the lag phase waits for the offered events to be folded",
    )
    parser.add_argument(
        "--phases",
        type=lambda text: tuple(text.split(",")),
        default=PHASES,
        help=f"comma-separated phases to run, of {','.join(PHASES)} (default: all)",
    )
    parser.add_argument(
        "--rss-tenants", type=int, default=RSS_TENANTS_DEFAULT, help="tenants in the RSS phase"
    )
    parser.add_argument(
        "--rss-events",
        type=lambda text: [int(n) for n in text.split(",")],
        default=list(RSS_EVENTS_DEFAULT),
        help="comma-separated usage event counts at which the processor's RSS is read",
    )
    parser.add_argument(
        "--rss-deadline-s",
        type=float,
        default=RSS_DEADLINE_S_DEFAULT,
        help="stop the RSS phase after this long (rss_complete: false)",
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="run the processor under cProfile; stats to this file"
    )
    parser.add_argument("--profile-lines", type=int, default=30, help="functions printed per profile listing")
    arguments = parser.parse_args(argv)
    assert arguments.events >= 1 and arguments.rate >= 1 and arguments.duration_s > 0, (
        "counts must be positive"
    )
    assert set(arguments.phases) <= set(PHASES), (
        f"unknown phases {sorted(set(arguments.phases) - set(PHASES))}"
    )
    assert arguments.rss_tenants >= 1 and all(n >= 1 for n in arguments.rss_events), (
        "RSS counts must be positive"
    )
    with tempfile.TemporaryDirectory(prefix="tollgate-bench-streams-") as workdir:
        result = asyncio.run(run(arguments, Path(workdir)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
