"""Audit replay: rebuild every tenant from `ledger.events` with the pure fold (`ledger.account`), and
compare with the live `ledger.balances`.

    replay(settings, until_offset=..., until_time_ms=...) -> ReplayResult
    verify(settings, result) -> list[Mismatch]

The replay reads each partition from the beginning up to its end offset at the start of the replay (or
up to `until_offset` / records stamped at or before `until_time_ms`) and folds it in memory. It accepts
and rejects records as the stream processor does (streams.processor): a record that does not decode, or
whose key is not its tenant, or that the fold refuses, is a dead letter, and so is usage for a tenant
without a grant on the partition; a tenant's stream time is the latest record time or usage time folded.
It calls the fold directly rather than `LedgerProcessor.process`, which also encodes every entry, balance
and state write the live path publishes: a replay needs none of them, and they cost more than the fold.

Fast on several cores: tenants never span partitions, so above `REPLAY_PARALLEL_RECORDS_MIN` records the
partitions are shared among `REPLAY_WORKERS_MAX` worker processes, each reading its own partitions from
the broker and folding them; each sends back its accounts (snapshots) and their usage by millisecond,
which is all that point-in-time queries of the result need.

The bulk read goes through confluent-kafka (librdkafka), every partition of a process assigned at once,
`consume` handing over up to `REPLAY_FETCH_MAX_RECORDS` messages per call: reading a record costs about
a microsecond of this process's CPU there, against several with aiokafka's pure-Python fetcher, and the
read is most of a replay's cost. Everything else here (end offsets, the live balances) and the rest of
the project use aiokafka.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException
from confluent_kafka import TopicPartition as ConfluentPartition

from ledger.account import Account
from ledger.codec import decode_input_event
from ledger.events import InvalidEvent, UsageRecorded
from ledger.snapshot import account_from_bytes, account_to_bytes
from ledger.usage_index import InMemoryUsageIndex
from streams.records import BalanceRecord
from streams.settings import StreamSettings
from streams.topics import LedgerTopics

REPLAY_FETCH_MAX_RECORDS = 10_000
REPLAY_FETCH_PARTITION_MAX_BYTES = 4 * 1024 * 1024  # per fetch and partition: large batches, few round trips
REPLAY_POLL_TIMEOUT_MS = 1_000
REPLAY_WORKERS_MAX = os.cpu_count() or 1  # worker processes of a parallel replay
REPLAY_PARALLEL_RECORDS_MIN = 200_000  # below this, one process: starting workers costs about a second
REPLAY_PROGRESS_INTERVAL_S = 0.2
REPLAY_STALL_TIMEOUT_S = 60  # a partition that yields nothing for this long (broker gone) fails the replay
REPLAY_PREFETCH_KBYTES = 64 * 1024  # librdkafka's prefetch queue per partition (queued.max.messages.kbytes)


class DictState:
    """`StateReader` over a dict: the processor's durable state kept in memory (tests, benchmarks)."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def items_with_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        return ((k, v) for k, v in list(self.data.items()) if k.startswith(prefix))

    def write_all(self, writes: list[tuple[bytes, bytes]]) -> None:
        self.data.update(writes)


@dataclass(frozen=True)
class ReplayedBalance:
    tenant_id: str
    balance: int
    overage: int
    as_of: int


@dataclass
class ReplayResult:
    tenants: dict[str, tuple[Account, InMemoryUsageIndex]]
    records: int
    dead_letters: int
    as_of: dict[str, int]  # tenant -> stream time reached

    def tenant_account(self, tenant_id: str) -> tuple[Account, InMemoryUsageIndex]:
        return self.tenants[tenant_id]

    def balances(self, at: int | None = None) -> list[ReplayedBalance]:
        out = []
        for tenant_id in sorted(self.as_of):
            account, index = self.tenants[tenant_id]
            t = self.as_of[tenant_id] if at is None else at
            out.append(
                ReplayedBalance(tenant_id, account.balance_at(t, index), account.overage_at(t, index), t)
            )
        return out

    def balance_at(self, tenant_id: str, t: int) -> tuple[int, int]:
        account, index = self.tenants[tenant_id]
        return account.balance_at(t, index), account.overage_total


@dataclass(frozen=True)
class Mismatch:
    tenant_id: str
    reason: str


# ---------------------------------------------------------------------------------------------- the fold


@dataclass
class _Fold:
    """What one process folded from its partitions."""

    tenants: dict[str, tuple[Account, InMemoryUsageIndex]] = field(default_factory=dict)
    stream_time: dict[str, int] = field(default_factory=dict)
    records: int = 0
    dead_letters: int = 0

    def fold(self, messages, ends: dict[int, int], until_time_ms: int | None) -> None:
        """Fold consumed messages (confluent-kafka's, of any of the partitions in `ends`) below their
        partition's end offset."""
        for message in messages:
            if message.error() is not None:
                raise KafkaException(message.error())
            if message.offset() >= ends[message.partition()]:
                continue  # appended after the replay started
            self.records += 1
            timestamp = message.timestamp()[1]
            if until_time_ms is not None and timestamp > until_time_ms:
                continue
            try:
                event = _decode(message.key(), message.value())
            except InvalidEvent:
                self.dead_letters += 1
                continue
            if not self._apply(event, timestamp):
                self.dead_letters += 1

    def _apply(self, event, timestamp: int) -> bool:
        """Fold one event into its tenant as the processor would; False when the processor would refuse it
        (usage for a tenant without a grant, or an event the fold rejects)."""
        tenant_id = event.tenant_id
        is_usage = type(event) is UsageRecorded
        pair = self.tenants.get(tenant_id)
        if pair is None:
            if is_usage:  # unknown tenant, as the processor says
                return False
            pair = self.tenants[tenant_id] = (Account(tenant_id), InMemoryUsageIndex())
        account, index = pair
        if is_usage and not account.blocks:
            return False
        try:
            if is_usage:
                account.apply_usage(event, index)
                timestamp = max(timestamp, event.occurred_at)
            else:
                account.apply(event, index)
        except InvalidEvent:
            return False
        if timestamp > self.stream_time.get(tenant_id, -1):
            self.stream_time[tenant_id] = timestamp
        return True

    def finish(self) -> None:
        for tenant_id, t in self.stream_time.items():
            self.tenants[tenant_id][0].advance_to(t)


def _decode(key: bytes | None, value: bytes | None):
    if value is None:
        raise InvalidEvent("empty record (no value)")
    event = decode_input_event(value)
    if key is not None and key != event.tenant_id.encode():
        raise InvalidEvent(f"record key {key!r} does not match tenant_id {event.tenant_id!r}")
    return event


def _fold_partitions(
    settings: StreamSettings,
    topic: str,
    ends: dict[int, int],
    until_time_ms: int | None,
    on_records: Callable[[int], None] | None = None,
) -> _Fold:
    """Read the partitions in `ends` from the beginning up to their end offsets, all at once (one partition
    at a time waits on a fetch round trip per batch: a third of the rate), and fold them (blocking: run it
    in a worker process or a thread)."""
    result = _Fold()
    remaining = {p: end for p, end in ends.items() if end > 0}
    if not remaining:
        return result
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            # librdkafka wants a group id; nothing joins it (assign, no subscribe) or commits
            "group.id": "tollgate-replay",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "max.partition.fetch.bytes": REPLAY_FETCH_PARTITION_MAX_BYTES,
            "queued.max.messages.kbytes": REPLAY_PREFETCH_KBYTES,
        }
    )
    try:
        consumer.assign([ConfluentPartition(topic, p, OFFSET_BEGINNING) for p in sorted(remaining)])
        last_progress = time.monotonic()
        while remaining:
            messages = consumer.consume(
                num_messages=REPLAY_FETCH_MAX_RECORDS, timeout=REPLAY_POLL_TIMEOUT_MS / 1000
            )
            if messages:
                last_progress = time.monotonic()
                result.fold(messages, ends, until_time_ms)
                if on_records:
                    on_records(result.records)
            for position in consumer.position([ConfluentPartition(topic, p) for p in remaining]):
                if position.offset >= remaining[position.partition]:  # the next offset is past the end
                    del remaining[position.partition]
            if remaining and time.monotonic() - last_progress > REPLAY_STALL_TIMEOUT_S:
                raise TimeoutError(
                    f"{topic} partitions {sorted(remaining)} gave nothing for {REPLAY_STALL_TIMEOUT_S} s"
                )
    finally:
        consumer.close()
    result.finish()
    return result


# ---------------------------------------------------------------------------------------------- workers


_worker_progress = None  # a shared array of records folded, one slot per worker (set in each worker)


def _init_worker(progress) -> None:
    global _worker_progress
    _worker_progress = progress


def _replay_in_worker(
    settings_json: bytes, topic: str, ends: dict[int, int], until_time_ms: int | None, slot: int
):
    """A worker process: fold its partitions; send back (records, dead letters, {tenant: (snapshot, usage
    history, stream time)})."""
    settings = StreamSettings.model_validate_json(settings_json)

    def on_records(records: int) -> None:
        _worker_progress[slot] = records

    fold = _fold_partitions(settings, topic, ends, until_time_ms, on_records)
    tenants = {
        tenant_id: (account_to_bytes(account), index.history(), fold.stream_time.get(tenant_id))
        for tenant_id, (account, index) in fold.tenants.items()
    }
    return fold.records, fold.dead_letters, tenants


def _share(ends: dict[int, int], workers: int) -> list[dict[int, int]]:
    """Partitions among workers, largest first to the least loaded."""
    shares: list[dict[int, int]] = [{} for _ in range(workers)]
    for partition, end in sorted(ends.items(), key=lambda item: -item[1]):
        min(shares, key=lambda share: sum(share.values()))[partition] = end
    return [share for share in shares if share]


async def _fold_in_workers(
    settings: StreamSettings,
    topic: str,
    ends: dict[int, int],
    until_time_ms: int | None,
    on_progress: Callable[[int, int], None] | None,
    workers: int,
) -> _Fold:
    shares = _share(ends, workers)
    context = multiprocessing.get_context("spawn")  # no fork of a running event loop
    progress = context.Array("q", len(shares), lock=False)
    total = sum(ends.values())
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(
        len(shares), mp_context=context, initializer=_init_worker, initargs=(progress,)
    ) as pool:
        settings_json = settings.model_dump_json().encode()
        futures = [
            loop.run_in_executor(pool, _replay_in_worker, settings_json, topic, share, until_time_ms, slot)
            for slot, share in enumerate(shares)
        ]
        while not all(future.done() for future in futures):
            await asyncio.wait(futures, timeout=REPLAY_PROGRESS_INTERVAL_S)
            if on_progress:
                on_progress(sum(progress), total)
        results = [future.result() for future in futures]
    fold = _Fold()
    for records, dead_letters, tenants in results:
        fold.records += records
        fold.dead_letters += dead_letters
        for tenant_id, (snapshot, history, stream_time) in tenants.items():
            assert tenant_id not in fold.tenants, f"tenant {tenant_id} folded by two workers"
            fold.tenants[tenant_id] = (
                account_from_bytes(snapshot),
                InMemoryUsageIndex.for_queries(history),
            )
            if stream_time is not None:
                fold.stream_time[tenant_id] = stream_time
    return fold


# ---------------------------------------------------------------------------------------------- replay


async def replay(
    settings: StreamSettings,
    *,
    until_offset: int | None = None,
    until_time_ms: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> ReplayResult:
    """`workers`: processes to fold in (1: this one); by default this one below
    `REPLAY_PARALLEL_RECORDS_MIN` records, else up to `REPLAY_WORKERS_MAX`, one partition at least each."""
    topics = LedgerTopics.from_settings(settings)
    ends = await _end_offsets(settings, topics.events)
    if until_offset is not None:
        ends = {partition: min(end, until_offset + 1) for partition, end in ends.items()}
    total = sum(ends.values())
    if workers is None:
        workers = REPLAY_WORKERS_MAX if total >= REPLAY_PARALLEL_RECORDS_MIN else 1
    assert workers >= 1, f"workers must be >= 1, got {workers}"
    workers = min(workers, len(ends))
    if workers > 1:
        fold = await _fold_in_workers(settings, topics.events, ends, until_time_ms, on_progress, workers)
    else:
        fold = await asyncio.to_thread(
            _fold_partitions,
            settings,
            topics.events,
            ends,
            until_time_ms,
            on_progress and (lambda records: on_progress(records, total)),
        )
    return ReplayResult(fold.tenants, fold.records, fold.dead_letters, fold.stream_time)


async def _end_offsets(settings: StreamSettings, topic: str) -> dict[int, int]:
    partitions = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]  # as declared
    consumer = await _assigned_consumer(settings, topic, partitions)
    try:
        return {tp.partition: end for tp, end in (await consumer.end_offsets(partitions)).items()}
    finally:
        await consumer.stop()


async def live_balances(settings: StreamSettings) -> dict[str, BalanceRecord]:
    """The latest record per tenant on the compacted `ledger.balances`."""
    topics = LedgerTopics.from_settings(settings)
    partitions = [TopicPartition(topics.balances, p) for p in range(settings.topic_partitions)]  # as declared
    consumer = await _assigned_consumer(settings, topics.balances, partitions)
    latest: dict[str, BalanceRecord] = {}
    try:
        remaining = {tp: end for tp, end in (await consumer.end_offsets(partitions)).items() if end > 0}
        while remaining:
            batch = await consumer.getmany(
                *remaining, timeout_ms=REPLAY_POLL_TIMEOUT_MS, max_records=REPLAY_FETCH_MAX_RECORDS
            )
            for tp, messages in batch.items():
                for message in messages:
                    record = msgspec.json.decode(message.value, type=BalanceRecord)
                    latest[record.tenant_id] = record
                if messages and messages[-1].offset + 1 >= remaining.get(tp, 0):
                    remaining.pop(tp, None)
    finally:
        await consumer.stop()
    return latest


def compare(result: ReplayResult, live: dict[str, BalanceRecord]) -> list[Mismatch]:
    """Every tenant the replay knows must have a live balance equal to the replay's at the same time."""
    mismatches = []
    for tenant_id in sorted(set(result.as_of) | set(live)):
        record = live.get(tenant_id)
        if record is None:
            mismatches.append(Mismatch(tenant_id, "no live balance published"))
            continue
        if tenant_id not in result.as_of:
            mismatches.append(Mismatch(tenant_id, "live balance for a tenant with no events"))
            continue
        balance, overage = result.balance_at(tenant_id, record.as_of)
        if (balance, overage) != (record.balance, record.overage):
            mismatches.append(
                Mismatch(
                    tenant_id,
                    f"live balance {record.balance} overage {record.overage} at {record.as_of}, "
                    f"replay {balance} overage {overage}",
                )
            )
    return mismatches


async def _assigned_consumer(
    settings: StreamSettings, topic: str, partitions: list[TopicPartition]
) -> AIOKafkaConsumer:
    """A group-less consumer assigned `partitions` of `topic`, at the beginning."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        group_id=None,
        request_timeout_ms=settings.admin_request_timeout_ms,
        max_partition_fetch_bytes=REPLAY_FETCH_PARTITION_MAX_BYTES,
    )
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            raise LookupError(f"topic {topic} does not exist")
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
    except BaseException:
        await consumer.stop()
        raise
    return consumer
