"""The ledger processor on plain aiokafka, a batch at a time: the default Kafka engine.

One loop per process: fetch a bounded batch from `ledger.events` (consumer group, manual commits),
fold each partition's records with the transport-free `LedgerProcessor`, then, in this order:
  1. write the batch's state (each touched tenant's account record holds its outbox: the outputs below)
     to the changelog topic (partition = source partition) and wait for the acks;
  2. publish the entries, balances and dead letters, and wait for the broker's acks;
  3. every `processor_commit_interval_ms`, commit the offsets of the batches that got through 1 and 2.
A crash anywhere replays from the last committed offsets: a tenant whose account record was written is
not folded again, and its stored outbox is published again byte for byte when its partition's state is
read back (streams.processor says why this order). Processing guarantee: at-least-once delivery of
byte-identical records, one content per entry id; exactly-once effect.

Pipelined: while batch N's writes wait for the broker (1 and 2), batch N+1 is fetched and folded in
memory (`BatchEngine.prepare`, a partition at a time, yielding to the event loop between partitions so
that N's acks are handled meanwhile). N+1's writes start only once N's publish is acknowledged, so the
order above holds batch by batch and nothing of N+1 is durable before all of N is. A failure of N's
writes discards N+1's in-memory effects with everything else (`reset`, then the committed offsets).

`BatchEngine` is that step without a transport (fold, persist, publish; read a partition's state back
and republish its outboxes on assignment): `BatchProcessor` runs it over aiokafka, and the deterministic
simulation (tests/simulation/) runs the very same code over a simulated log with injected crashes.

State. The changelog `<app id>-batch-state-changelog` is compacted and co-partitioned with
`ledger.events`. A partition's state is read back from it the first time a batch of that partition
arrives after an assignment, so a restarted or rebalanced processor recovers exactly the tenants it now
owns. When partitions are revoked, the batch in flight finishes and its offsets are committed first.
The state read back lives on disk (`streams.state_store.RocksState`, in `processor_state_dir`), and so
do the processor's seen-id index and per-millisecond usage index (its `usage_indexes`), with bounded
caches in front: the processor's memory does not grow with usage. The changelog is streamed into the
store in chunks, never held whole. The store is a cache of the changelog: a restarted process wipes it
and reads its partitions back. (The faust engine keeps its state in its faust table, the embedded driver
in Postgres; neither uses this store.)

Why not the faust agent (streams.faust_app, kept as `tollgate streams --engine faust`)? faust hands every
record through its stream machinery one at a time (its consumer waits on each delivery as a separate
task), which costs about 100 µs of CPU per event here; this loop touches a record a handful of times
(26-32 µs per event with the on-disk state, the outbox and the hash chain; half of it the fold), so one
processor folds several times as many events.

Run it with `tollgate streams` (or `python -m streams.batch_processor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from streams.processor import LedgerProcessor, ProcessorOutput
from streams.processor_settings import ProcessorSettings
from streams.producer import BrokerUnavailable, EventProducer, PartitionedRecord
from streams.records import LogRecord
from streams.state_store import RocksState
from streams.topics import LedgerTopics, ensure_topics, state_changelog_spec

log = logging.getLogger(__name__)

READY_LOG_LINE = "Processor ready"
CHANGELOG_FETCH_MAX_RECORDS = 10_000
CHANGELOG_FETCH_TIMEOUT_MS = 500


def changelog_topic(settings: ProcessorSettings) -> str:
    return f"{settings.processor_app_id}-batch-state-changelog"


def consumer_group(settings: ProcessorSettings) -> str:
    """Its own group: the faust engine's committed offsets mean nothing without the faust table."""
    return f"{settings.processor_app_id}-batch"


class PartitionedState:
    """`StateReader` over the state of the partitions this process owns, droppable per partition, in RAM:
    the reference the on-disk `RocksState` is tested against (tests/streams/test_state_store.py)."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._keys_of: dict[int, set[bytes]] = {}

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def items_with_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        return ((k, v) for k, v in list(self._data.items()) if k.startswith(prefix))

    def put(self, partition: int, key: bytes, value: bytes | None) -> None:
        keys = self._keys_of.setdefault(partition, set())
        if value is None:  # a tombstone
            self._data.pop(key, None)
            keys.discard(key)
            return
        self._data[key] = value
        keys.add(key)

    def put_all(self, partition: int, records: Iterable[tuple[bytes, bytes | None]]) -> None:
        for key, value in records:
            self.put(partition, key, value)

    def drop(self, partition: int) -> None:
        for key in self._keys_of.pop(partition, ()):
            del self._data[key]

    def __len__(self) -> int:
        return len(self._data)


class EngineTransport(Protocol):
    """What the batch step needs from a log: ordered, acknowledged writes, and a partition's state back."""

    async def write_state(self, records: list[PartitionedRecord]) -> None:
        """Append to the state changelog, in order per partition; return once every record is acked."""

    async def publish(self, records: list[PartitionedRecord]) -> None:
        """Append the outputs (entries, balances, dead letters); return once every record is acked."""

    def read_state(self, partition: int) -> AsyncIterator[list[tuple[bytes, bytes | None]]]:
        """Every (key, value) on the changelog partition up to its end, in order (None: a tombstone), a
        chunk at a time (a partition's whole changelog is never held at once)."""


class BatchEngine:
    """The batch step without a transport: fold -> persist state and outboxes -> publish. The caller
    commits source offsets only after `fold` returned, and calls `reset` after any failure (a batch that
    was not acknowledged), then resumes from its committed offsets. The state lives on disk, in `state`
    (`BatchProcessor`: this process's directory under `processor_state_dir`) or a temporary directory of
    its own; the engine owns it, and `close` deletes it."""

    def __init__(
        self,
        transport: EngineTransport,
        *,
        topics: LedgerTopics,
        changelog_topic: str,
        partitions: int,
        state: RocksState | None = None,
    ) -> None:
        self.transport = transport
        self.topics = topics
        self.changelog_topic = changelog_topic
        self.partitions = partitions
        self.state = RocksState() if state is None else state
        self.processor = LedgerProcessor(
            self.state, source_topic=topics.events, usage_indexes=self.state.usage_indexes
        )
        self.loaded: set[int] = set()  # source partitions whose state is in `self.state`

    def close(self) -> None:
        self.state.close()

    async def ensure_loaded(self, partitions) -> None:
        for partition in sorted(set(partitions) - self.loaded):
            await self.load(partition)

    async def load(self, partition: int) -> None:
        """Read a partition's state back and publish its tenants' stored outboxes again (a crash may have
        come between writing a tenant's account record and publishing what it holds)."""
        started = time.monotonic()
        self.state.drop(partition)
        self.processor.forget({partition}, self.partitions)
        records = 0
        async for chunk in self.transport.read_state(partition):
            self.state.put_all(partition, chunk)
            records += len(chunk)
        recovered = self.processor.recover(self.partitions, {partition})
        await self.emit(recovered)
        self.loaded.add(partition)
        log.info(
            "partition %d: state read back from %d changelog records, %d outboxes sent again, in %.2f s",
            partition,
            records,
            sum(o.republished_outboxes for _, o in recovered),
            time.monotonic() - started,
        )

    async def fold(self, batches: dict[int, list[LogRecord]]) -> None:
        """One batch: each partition's records in offset order, from the caller's position."""
        await self.ensure_loaded(p for p, records in batches.items() if records)
        await self.emit(self.prepare(batches))

    def prepare(self, batches: dict[int, list[LogRecord]]) -> list[tuple[int, ProcessorOutput]]:
        """Fold a batch of loaded partitions in memory: nothing is durable or published until `emit`."""
        assert self.loaded.issuperset(p for p, records in batches.items() if records), "ensure_loaded first"
        return [
            (partition, self.processor.process(partition, records))
            for partition, records in batches.items()
            if records
        ]

    async def sweep(self, now_ms: int) -> None:
        """Publish what `now_ms` has passed for the quiet tenants of the loaded partitions."""
        await self.emit(self.processor.expire_quiet(now_ms, self.partitions, self.loaded))

    def release(self, partitions) -> None:
        partitions = set(partitions)
        for partition in partitions:
            self.state.drop(partition)
            self.loaded.discard(partition)
        self.processor.forget(partitions, self.partitions)

    def reset(self) -> None:
        """After a failure: forget everything; state is read back from the changelog."""
        self.release(list(self.loaded))
        self.processor.forget()

    async def emit(self, outputs: list[tuple[int, ProcessorOutput]]) -> None:
        """(source partition, output) pairs: the state (with the outboxes) is acked before the outputs go
        out."""
        await self._write_state(outputs)
        await self._publish(outputs)

    async def _write_state(self, outputs: list[tuple[int, ProcessorOutput]]) -> None:
        """In order, on the source partition's changelog partition, acked before anything is published."""
        writes = [
            PartitionedRecord(self.changelog_topic, partition, key, value)
            for partition, output in outputs
            for key, value in output.state_writes
        ]
        if writes:
            await self.transport.write_state(writes)
            for partition, output in outputs:
                if output.state_writes:
                    self.state.put_all(partition, output.state_writes)

    async def _publish(self, outputs: list[tuple[int, ProcessorOutput]]) -> None:
        """To the source partition: the derived topics are co-partitioned with `ledger.events` (key =
        tenant)."""
        topics = self.topics
        outgoing = [
            PartitionedRecord(topic, partition, record.key, record.value)
            for partition, output in outputs
            for topic, records in (
                (topics.entries, output.entries),
                (topics.balances, output.balances),
                (topics.dlq, output.dead_letters),
                (topics.checkpoints, output.checkpoints),
                (topics.alerts, output.alerts),
            )
            for record in records
        ]
        if outgoing:
            await self.transport.publish(outgoing)


class KafkaTransport:
    """`EngineTransport` over the broker: the processor's idempotent producer and a group-less changelog
    reader."""

    def __init__(self, settings: ProcessorSettings, producer: EventProducer, changelog_topic: str) -> None:
        self.settings = settings
        self.producer = producer
        self.changelog_topic = changelog_topic
        self.reader: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self.reader = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=self.settings.processor_fetch_partition_max_bytes,
        )
        await self.reader.start()

    async def stop(self) -> None:
        if self.reader is not None:
            await self.reader.stop()
            self.reader = None

    async def write_state(self, records: list[PartitionedRecord]) -> None:
        await self.producer.send_partitioned(records)

    async def publish(self, records: list[PartitionedRecord]) -> None:
        await self.producer.send_partitioned(records)

    async def read_state(self, partition: int) -> AsyncIterator[list[tuple[bytes, bytes | None]]]:
        reader = self.reader
        assert reader is not None, "KafkaTransport.start() first"
        tp = TopicPartition(self.changelog_topic, partition)
        reader.assign([tp])
        end = (await reader.end_offsets([tp]))[tp]
        await reader.seek_to_beginning(tp)
        started = time.monotonic()
        while await reader.position(tp) < end:
            if time.monotonic() - started > self.settings.processor_changelog_read_timeout_ms / 1000:
                raise BrokerUnavailable(f"changelog {tp.topic}[{partition}] not read back within the timeout")
            batch = await reader.getmany(
                tp, timeout_ms=CHANGELOG_FETCH_TIMEOUT_MS, max_records=CHANGELOG_FETCH_MAX_RECORDS
            )
            messages = batch.get(tp)
            if messages:
                yield [(message.key, message.value) for message in messages]


class _CommitBeforeRevoke(ConsumerRebalanceListener):
    def __init__(self, engine: BatchProcessor) -> None:
        self._engine = engine

    async def on_partitions_revoked(self, revoked) -> None:
        await self._engine.release(revoked)

    async def on_partitions_assigned(self, assigned) -> None:
        log.info(
            "assigned %s (state is read back before the next batch)", sorted(tp.partition for tp in assigned)
        )


class BatchProcessor:
    def __init__(self, settings: ProcessorSettings, producer: EventProducer | None = None) -> None:
        self.settings = settings
        self.topics = LedgerTopics.from_settings(settings)
        self.changelog_topic = changelog_topic(settings)
        self.producer = producer or EventProducer(settings)
        self.transport = KafkaTransport(settings, self.producer, self.changelog_topic)
        self.engine = BatchEngine(
            self.transport,
            topics=self.topics,
            changelog_topic=self.changelog_topic,
            partitions=settings.topic_partitions,
            state=RocksState.claimed_under(Path(settings.processor_state_dir)),
        )
        self.state = self.engine.state
        self.processor = self.engine.processor
        self._consumer: AIOKafkaConsumer | None = None
        self._committable: dict[TopicPartition, int] = {}  # next offsets acked through state and outputs
        self._lock = asyncio.Lock()  # one batch folded at a time; a revoke waits for the batch in flight
        # The emit (state, then outputs) of the last folded batch, with the offsets it makes committable.
        self._in_flight: tuple[asyncio.Task, dict[TopicPartition, int]] | None = None
        self._failed: BrokerUnavailable | None = None  # an emit that failed while a revoke waited for it

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        settings = self.settings
        await ensure_topics(
            settings.kafka_bootstrap_servers,
            [state_changelog_spec(settings, self.changelog_topic)],
            request_timeout_ms=settings.admin_request_timeout_ms,
        )
        await self.producer.start()
        await self.transport.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            group_id=consumer_group(settings),
            client_id=f"{settings.processor_app_id}-processor",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_partition_fetch_bytes=settings.processor_fetch_partition_max_bytes,
            fetch_max_wait_ms=settings.processor_batch_wait_ms,
            session_timeout_ms=settings.processor_session_timeout_ms,
            heartbeat_interval_ms=settings.processor_heartbeat_interval_ms,
        )
        await self._consumer.start()
        self._consumer.subscribe([self.topics.events], listener=_CommitBeforeRevoke(self))

    async def stop(self) -> None:
        try:
            if self._consumer is not None:
                async with self._lock:
                    with contextlib.suppress(BrokerUnavailable):
                        await self._settle()
                    await self._commit()
                await self._consumer.stop()  # leaves the group: its partitions move at once
                self._consumer = None
            await self.transport.stop()
            await self.producer.stop()
        finally:
            self.engine.close()  # the on-disk state goes with the process (the changelog has it all)

    async def run(self, stop: asyncio.Event) -> None:
        """Fold until `stop` is set; retries a failed batch from the committed offsets, boundedly."""
        settings = self.settings
        consumer = self._consumer
        assert consumer is not None, "BatchProcessor.start() first"
        last_commit = last_sweep = time.monotonic()
        failures = 0
        while not stop.is_set():
            batches = await consumer.getmany(
                timeout_ms=settings.processor_batch_wait_ms, max_records=settings.processor_batch_max
            )
            try:
                async with self._lock:
                    await self._fold(batches)
                    now = time.monotonic()
                    if now - last_sweep >= settings.processor_expiry_sweep_interval_ms / 1000:
                        await self._settle()  # a sweep writes state: after the batch in flight
                        await self.engine.sweep(int(time.time() * 1000) - settings.processor_expiry_grace_ms)
                        last_sweep = now
                    if now - last_commit >= settings.processor_commit_interval_ms / 1000:
                        if self._in_flight is not None and self._in_flight[0].done():
                            await self._settle()
                        await self._commit()
                        last_commit = now
                failures = 0
            except BrokerUnavailable as error:
                failures += 1
                if failures > settings.processor_batch_retries_max:
                    raise
                backoff_s = settings.processor_retry_backoff_initial_ms * 2 ** (failures - 1) / 1000
                log.warning(
                    "batch not acknowledged (%s); retrying from the committed offsets in %.1f s",
                    error,
                    backoff_s,
                )
                await asyncio.sleep(backoff_s)
                async with self._lock:
                    await self._rewind()

    # ------------------------------------------------------------------------------------ one batch

    async def _fold(self, batches: dict[TopicPartition, list]) -> None:
        """Fold a batch while the previous one's emit is in flight, then start this one's emit."""
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed
        assigned = self._consumer.assignment()
        # Every assigned partition is read back (and its outboxes sent again) before it is folded or swept,
        # a quiet one included.
        partitions = {tp.partition for tp in assigned if tp.topic == self.topics.events}
        if not partitions <= self.engine.loaded:
            await self._settle()
            await self.engine.ensure_loaded(partitions)
        owned = {
            tp: messages for tp, messages in batches.items() if tp in assigned and messages
        }  # else revoked after the fetch
        if not owned:
            return
        outputs = []
        for tp, messages in owned.items():
            partition = tp.partition
            records = [LogRecord(m.topic, partition, m.offset, m.key, m.value, m.timestamp) for m in messages]
            outputs += self.engine.prepare({partition: records})
            await asyncio.sleep(0)  # the previous batch's acks are handled between partitions
        await self._settle()  # the previous batch is acknowledged before anything of this one is written
        self._in_flight = (
            asyncio.create_task(self.engine.emit(outputs)),
            {tp: messages[-1].offset + 1 for tp, messages in owned.items()},
        )

    async def _settle(self) -> None:
        """Wait for the batch in flight; its offsets become committable. Raises what its emit raised."""
        if self._in_flight is None:
            return
        (emitting, offsets), self._in_flight = self._in_flight, None
        await emitting
        self._committable.update(offsets)

    async def _commit(self) -> None:
        if not self._committable:
            return
        offsets, self._committable = self._committable, {}
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as error:  # the group moved on: the new owner replays, deduped
            log.warning(
                "offset commit failed (%r); the partitions' next owner replays from the previous commit",
                error,
            )

    # ------------------------------------------------------------------------------------ ownership

    async def release(self, revoked) -> None:
        """Partitions are going: finish the batch in flight, commit, and forget their state."""
        async with self._lock:
            try:
                await self._settle()
            except BrokerUnavailable as error:  # the run loop rewinds before its next batch
                self._failed = error
            await self._commit()
            for tp in revoked:
                self._committable.pop(tp, None)
            self.engine.release(tp.partition for tp in revoked)
        log.info("released %s", sorted(tp.partition for tp in revoked))

    async def _rewind(self) -> None:
        """After a failed batch: drop every cached state and go back to the committed offsets."""
        with contextlib.suppress(BrokerUnavailable):
            await self._settle()  # a batch still in flight (the failure was elsewhere): let it end first
        self._committable.clear()
        self._failed = None
        self.engine.reset()
        self._committable.clear()
        for tp in self._consumer.assignment():
            committed = await self._consumer.committed(tp)
            if committed is None:
                await self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, committed)


async def serve(settings: ProcessorSettings) -> None:
    engine = BatchProcessor(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await engine.start()
    log.info("%s: consuming %s as group %s", READY_LOG_LINE, engine.topics.events, consumer_group(settings))
    try:
        await engine.run(stop)
    finally:
        with contextlib.suppress(Exception):
            await engine.stop()


def run_processor(settings: ProcessorSettings | None = None, *, loglevel: str = "INFO") -> None:
    """Run one stream processor in this process until it is stopped (SIGTERM/SIGINT)."""
    from tollgate.logging_setup import configure_logging

    configure_logging(loglevel)
    asyncio.run(serve(settings or ProcessorSettings()))


# Old name, kept only for tollgate.cli until it calls run_processor (its owner changes that line).
run_worker = run_processor


if __name__ == "__main__":
    run_processor()
