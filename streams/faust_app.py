"""The faust-streaming engine: one agent folds `ledger.events` into a changelog-backed table.

The default engine is streams.batch_processor (same fold, same write order, plain aiokafka batches):
faust's per-record stream path costs about 100 µs of CPU per event, several times the fold itself.

Processing guarantee: the state-first outbox of streams.processor, on purpose. faust's exactly_once
mode is known to duplicate and crash on rebalances (faust-streaming issues #517, #323, #440). Each batch
writes its state to the table (each touched tenant's account record holding that batch's outputs for
it) and waits for the changelog's acks, then publishes the outputs. A tenant read back from the table
(after a restart or a rebalance: `forget` on every rebalance and on any failure) has its stored outbox
published again, byte for byte, before anything new for it: at the tenant's next record, or at the next
expiry sweep, which visits every tenant of the assigned partitions.

The table `ledger-state` (memory store, changelog topic `<app id>-ledger-state-changelog`) holds, per
tenant, the account snapshot with the highest source offset folded in, and the seen usage ids. Every
write goes to the changelog partition of the tenant's source partition, so a restarted or rebalanced
worker recovers exactly the tenants it owns.

Run it with `tollgate streams --engine faust` (or `python -m streams.faust_app`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Iterator

import faust
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as faust_aiokafka

from streams.processor import LedgerProcessor, ProcessorOutput
from streams.processor_settings import ProcessorSettings
from streams.producer import EventProducer
from streams.records import LogRecord
from streams.spool import OutgoingRecord
from streams.topics import LedgerTopics

log = logging.getLogger(__name__)

STATE_TABLE = "ledger-state"


class IdempotentProducer(faust_aiokafka.Producer):
    """faust enables idempotence only inside transactions; every Tollgate producer is idempotent."""

    def _settings_extra(self):
        return {"acks": "all", "enable_idempotence": True}


class IdempotentTransport(faust_aiokafka.Transport):
    Producer = IdempotentProducer


TRANSPORTS.data["tollgate"] = f"{__name__}:IdempotentTransport"


class TableState:
    """`StateReader` over the table's local store."""

    def __init__(self, table: faust.Table) -> None:
        self._table = table

    def get(self, key: bytes) -> bytes | None:
        return self._table.data.get(key)

    def items_with_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        for key, value in list(self._table.data.items()):
            if key.startswith(prefix):
                yield key, value

    def restore(self, values: dict[bytes, bytes | None]) -> None:
        """Put keys back as they were locally (None: absent), after writes that were not acknowledged."""
        for key, value in values.items():
            if value is None:
                self._table.data.pop(key, None)
            else:
                self._table.data[key] = value

    def write(self, partition: int, key: bytes, value: bytes):
        """Set locally and send to the changelog; returns the send's future (resolved on the broker's ack)."""
        self._table.data[key] = value
        return self._table.send_changelog(partition, key, value)


def records_by_partition(events) -> dict[int, list[LogRecord]]:
    """faust's events (a batch from `take_events`) as log records, grouped by source partition."""
    by_partition: dict[int, list[LogRecord]] = defaultdict(list)
    for event in events:
        message = event.message
        by_partition[message.partition].append(
            LogRecord(
                message.topic,
                message.partition,
                message.offset,
                message.key,
                message.value,
                int(message.timestamp * 1000),
            )
        )
    return by_partition


def outgoing_records(topics: LedgerTopics, outputs: list[ProcessorOutput]) -> list[OutgoingRecord]:
    """The records the outputs publish: entries, balances, dead letters, checkpoints and alerts, each to its
    topic."""
    return [
        OutgoingRecord(topic, r.key, r.value)
        for output in outputs
        for topic, records in (
            (topics.entries, output.entries),
            (topics.balances, output.balances),
            (topics.dlq, output.dead_letters),
            (topics.checkpoints, output.checkpoints),
            (topics.alerts, output.alerts),
        )
        for r in records
    ]


class FaustFold:
    """What the agent and the expiry sweep do with the processor's outputs: write the state, wait for its
    acks, then publish (the producer is started at the first publish)."""

    def __init__(
        self, processor: LedgerProcessor, state: TableState, producer: EventProducer, topics: LedgerTopics
    ) -> None:
        self.processor = processor
        self._state = state
        self._producer = producer
        self._topics = topics
        self._producer_starting = asyncio.Lock()
        self.producer_running = asyncio.Event()

    async def fold(self, events) -> None:
        try:
            outputs = {
                partition: self.processor.process(partition, records)
                for partition, records in records_by_partition(events).items()
            }
            await self._write_state([(output, partition) for partition, output in outputs.items()])
            await self._publish(list(outputs.values()))  # one round trip for the whole batch
        except BaseException:
            # what is cached may be ahead of the table: read it back, send outboxes again
            self.processor.forget()
            raise

    async def sweep(self, now_ms: int, partitions: int, assigned: set[int]) -> None:
        swept = self.processor.expire_quiet(now_ms, partitions, assigned)
        try:
            if swept:
                await self._write_state([(output, partition) for partition, output in swept])
                await self._publish([output for _, output in swept])
        except BaseException:
            self.processor.forget()
            raise

    async def stop(self) -> None:
        if self.producer_running.is_set():
            await self._producer.stop()

    async def _ensure_producer(self) -> None:
        async with self._producer_starting:
            if not self.producer_running.is_set():
                await self._producer.start()
                self.producer_running.set()

    async def _publish(self, outputs: list[ProcessorOutput]) -> None:
        """After the state that holds them (the outboxes) was acked; acked (or durably spooled) before
        the batch returns and faust may commit its offsets."""
        outgoing = outgoing_records(self._topics, outputs)
        if outgoing:
            await self._ensure_producer()
            await self._producer.send_many(outgoing)

    async def _write_state(self, outputs: list[tuple[ProcessorOutput, int]]) -> None:
        """Write, in order, then wait for the broker's acks before anything is published: faust acks the
        source records when this batch returns and may commit their offsets soon after; its flush before
        a commit does not cover changelog records still lingering in the producer (a kill -9 then lost
        folded events)."""
        writes = [
            (partition, key, value) for output, partition in outputs for key, value in output.state_writes
        ]
        if not writes:
            return
        state = self._state
        before = {key: state.get(key) for _, key, _ in writes}
        try:
            await asyncio.gather(*[state.write(partition, key, value) for partition, key, value in writes])
        except BaseException:
            state.restore(before)  # not acked: the table must not hold what a restart would not read back
            raise


def _faust_app(settings: ProcessorSettings) -> faust.App:
    """One faust.App with every option explicit."""
    return faust.App(
        settings.processor_app_id,
        broker=[f"tollgate://{server}" for server in settings.kafka_bootstrap_servers.split(",")],
        store="memory://",
        processing_guarantee="at_least_once",
        version=1,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        topic_allow_declare=True,  # the changelog topic; the ledger topics exist already (ensure_topics)
        producer_acks=-1,
        producer_linger=settings.processor_changelog_linger_ms / 1000,
        producer_max_batch_size=settings.processor_changelog_batch_size_bytes,
        broker_commit_interval=settings.processor_commit_interval_ms / 1000,
        broker_commit_every=settings.processor_batch_max,
        broker_session_timeout=settings.processor_session_timeout_ms / 1000,
        broker_heartbeat_interval=settings.processor_heartbeat_interval_ms / 1000,
        consumer_auto_offset_reset="earliest",
        stream_buffer_maxsize=settings.processor_stream_buffer_max,
        table_standby_replicas=0,
        web_enabled=False,
        datadir=settings.processor_data_dir,
    )


def create_app(settings: ProcessorSettings) -> faust.App:
    topics = LedgerTopics.from_settings(settings)
    app = _faust_app(settings)
    source = app.topic(
        topics.events,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.topic_partitions,
        internal=False,
    )
    table = app.Table(
        STATE_TABLE, default=None, key_type=bytes, value_type=bytes, partitions=settings.topic_partitions
    )
    state = TableState(table)
    processor = LedgerProcessor(state, source_topic=topics.events)
    folding = FaustFold(processor, state, EventProducer(settings), topics)
    app.ledger_processor = processor  # for tests and introspection

    @app.on_rebalance_complete.connect
    async def forget_tenants(sender, **kwargs) -> None:
        processor.forget()

    @app.agent(source, concurrency=1)
    async def fold(stream) -> None:
        async for events in stream.take_events(
            settings.processor_batch_max, within=settings.processor_batch_wait_ms / 1000
        ):
            await folding.fold(events)

    @app.timer(interval=settings.processor_expiry_sweep_interval_ms / 1000)
    async def sweep_expiries() -> None:
        now_ms = int(time.time() * 1000) - settings.processor_expiry_grace_ms
        assigned = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topics.events}
        await folding.sweep(now_ms, settings.topic_partitions, assigned)

    @app.on_before_shutdown.connect
    async def stop_output_producer(sender, **kwargs) -> None:
        await folding.stop()

    return app


def run_processor(settings: ProcessorSettings | None = None, *, loglevel: str = "INFO") -> None:
    """Run one stream processor in this process until it is stopped (SIGTERM/SIGINT)."""
    app = create_app(settings or ProcessorSettings())
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


if __name__ == "__main__":
    run_processor()
