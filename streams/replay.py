"""Audit replay: rebuild every tenant from `ledger.events` with the same processor the live path runs,
and compare with the live `ledger.balances`.

    replay(settings, until_offset=..., until_time_ms=...) -> ReplayResult
    verify(settings, result) -> list[Mismatch]

The replay reads each partition from the beginning up to its end offset at the start of the replay (or
up to `until_offset` / records stamped at or before `until_time_ms`), into an in-memory state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.processor import BalanceRecord, LedgerProcessor
from streams.records import LogRecord
from streams.settings import StreamSettings
from streams.topics import LedgerTopics

REPLAY_FETCH_MAX_RECORDS = 5_000
REPLAY_POLL_TIMEOUT_MS = 1_000


class DictState:
    """`StateReader` over a dict: the processor's durable state kept in memory (replays, tests)."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def items_with_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        return ((k, v) for k, v in list(self.data.items()) if k.startswith(prefix))

    def write_all(self, writes: list[tuple[bytes, bytes]]) -> None:
        self.data.update(writes)


@dataclass(frozen=True)
class TenantBalance:
    tenant_id: str
    balance: int
    overage: int
    as_of: int


@dataclass
class ReplayResult:
    processor: LedgerProcessor
    records: int
    dead_letters: int
    as_of: dict[str, int]  # tenant -> stream time reached

    def balances(self, at: int | None = None) -> list[TenantBalance]:
        out = []
        for tenant_id in sorted(self.as_of):
            account, index = self.processor.tenant_account(tenant_id)
            t = self.as_of[tenant_id] if at is None else at
            out.append(TenantBalance(tenant_id, account.balance_at(t, index), account.overage_at(t, index), t))
        return out

    def balance_at(self, tenant_id: str, t: int) -> tuple[int, int]:
        account, index = self.processor.tenant_account(tenant_id)
        return account.balance_at(t, index), account.overage_total


@dataclass(frozen=True)
class Mismatch:
    tenant_id: str
    reason: str


async def replay(
    settings: StreamSettings,
    *,
    until_offset: int | None = None,
    until_time_ms: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    topics = LedgerTopics.from_settings(settings)
    state = DictState()
    processor = LedgerProcessor(state, source_topic=topics.events)
    consumer, partitions = await _assigned_consumer(settings, topics.events)
    records = dead_letters = 0
    stream_time: dict[str, int] = {}
    try:
        ends = await consumer.end_offsets(partitions)
        if until_offset is not None:
            ends = {tp: min(end, until_offset + 1) for tp, end in ends.items()}
        total = sum(ends.values())
        remaining = {tp: end for tp, end in ends.items() if end > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=REPLAY_POLL_TIMEOUT_MS, max_records=REPLAY_FETCH_MAX_RECORDS)
            for tp, messages in batch.items():
                end = remaining.get(tp)
                if end is None:
                    continue
                kept = [
                    LogRecord(tp.topic, tp.partition, m.offset, m.key, m.value, m.timestamp)
                    for m in messages
                    if m.offset < end and (until_time_ms is None or m.timestamp <= until_time_ms)
                ]
                output = processor.process(tp.partition, kept)
                state.write_all(output.state_writes)
                dead_letters += len(output.dead_letters)
                for balance in output.balances:
                    record = msgspec.json.decode(balance.value, type=BalanceRecord)
                    stream_time[record.tenant_id] = record.as_of
                records += len(messages)
                if messages and messages[-1].offset + 1 >= end:
                    del remaining[tp]
            if on_progress:
                on_progress(records, total)
    finally:
        await consumer.stop()
    return ReplayResult(processor, records, dead_letters, stream_time)


async def live_balances(settings: StreamSettings) -> dict[str, BalanceRecord]:
    """The latest record per tenant on the compacted `ledger.balances`."""
    topics = LedgerTopics.from_settings(settings)
    consumer, partitions = await _assigned_consumer(settings, topics.balances)
    latest: dict[str, BalanceRecord] = {}
    try:
        remaining = {tp: end for tp, end in (await consumer.end_offsets(partitions)).items() if end > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=REPLAY_POLL_TIMEOUT_MS, max_records=REPLAY_FETCH_MAX_RECORDS)
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
                Mismatch(tenant_id, f"live balance {record.balance} overage {record.overage} at {record.as_of}, "
                                    f"replay {balance} overage {overage}")
            )
    return mismatches


async def _assigned_consumer(settings: StreamSettings, topic: str) -> tuple[AIOKafkaConsumer, list[TopicPartition]]:
    """A group-less consumer assigned every partition of `topic`, at the beginning."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        group_id=None,
        request_timeout_ms=settings.admin_request_timeout_ms,
    )
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            raise LookupError(f"topic {topic} does not exist")
        partitions = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]  # as declared
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
    except BaseException:
        await consumer.stop()
        raise
    return consumer, partitions


