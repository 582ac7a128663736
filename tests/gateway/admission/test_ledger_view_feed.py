"""The view fed from a real log — a Kafka broker and the embedded Postgres log, the same test — by the
real processor: a grant is read at start-up, a finished request's hold drops once its usage is folded."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission.factory import AdmissionRuntime
from gateway.admission.fast import FastAdmission
from gateway.admission.settings import AdmissionSettings
from ledger.events import CreditGranted, UsageRecorded
from storage.database import build_async_engine
from streams.embedded_log import PostgresLog
from streams.log import KafkaLog
from streams.processor import LedgerProcessor
from streams.spool import OutgoingRecord
from tests.gateway.admission.helpers import admission_request, new_metrics
from tests.streams.helpers import create_ledger_topics, stream_settings

WAIT_S = 30
T0 = 1_700_000_000_000


@pytest.fixture(
    params=[
        pytest.param("kafka", marks=pytest.mark.kafka),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
async def logs(request, topic_prefix, tmp_path):
    """Two clients of one log: the gateway's, and the processor's (another process in production)."""
    if request.param == "kafka":
        broker = request.getfixturevalue("kafka_broker")
        settings = stream_settings(broker.bootstrap, topic_prefix, tmp_path)
        await create_ledger_topics(settings)
        processor_settings = settings.model_copy(update={"spool_path": tmp_path / "processor-spool.sqlite3"})
        pair = (KafkaLog(settings), KafkaLog(processor_settings))
        engine = None
    else:
        settings = stream_settings("unused:9092", topic_prefix, tmp_path)
        engine = build_async_engine(
            request.getfixturevalue("database_url"), request.getfixturevalue("database_settings")
        )
        pair = (PostgresLog(engine, settings), PostgresLog(engine, settings))
    for log in pair:
        await log.start()
    yield pair
    for log in pair:
        await log.stop()
    if engine is not None:
        await engine.dispose()


class ProcessorStep:
    """The ledger processor without a transport: read new events, fold, append entries and balances."""

    def __init__(self, log) -> None:
        self.log = log
        self.state: dict[bytes, bytes] = {}
        self.processor = LedgerProcessor(self, source_topic=log.topics.events)
        self.next_offsets = dict.fromkeys(range(log.partitions), 0)

    def get(self, key: bytes) -> bytes | None:
        return self.state.get(key)

    def items_with_prefix(self, prefix: bytes):
        return [(k, v) for k, v in self.state.items() if k.startswith(prefix)]

    async def run(self) -> None:
        topics = self.log.topics
        for partition, offset in self.next_offsets.items():
            records = await self.log.read(topics.events, partition, offset, 1_000)
            if not records:
                continue
            self.next_offsets[partition] = records[-1].offset + 1
            output = self.processor.process(partition, records)
            outgoing = [OutgoingRecord(topics.entries, r.key, r.value) for r in output.entries]
            outgoing += [OutgoingRecord(topics.balances, r.key, r.value) for r in output.balances]
            await self.log.append_many(outgoing)
            self.state.update(output.state_writes)


async def eventually(predicate) -> None:
    async with asyncio.timeout(WAIT_S):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_view_reads_balances_at_start_and_settles_a_finished_request_once_folded(logs):
    event_log, processor_log = logs
    step = ProcessorStep(processor_log)
    await event_log.publish(
        CreditGranted(
            event_id="g1",
            tenant_id="acme",
            grant_id="g1",
            amount=1_000,
            effective_at=T0,
            expires_at=T0 + 10**12,
        )
    )
    await step.run()

    settings = AdmissionSettings(view_lag_check_interval_ms=50, view_ready_wait_ms=WAIT_S * 1000)
    runtime = AdmissionRuntime.create(event_log, settings, metrics=new_metrics())
    view, admission = runtime.view, runtime.admission
    assert isinstance(admission, FastAdmission)
    await runtime.start()
    try:
        assert await runtime.feed.wait_ready(WAIT_S * 1000)
        balance = view.balance("acme")
        assert (balance.balance, balance.expiring) == (1_000, ((T0 + 10**12, 1_000),))

        reservation = await admission.admit(admission_request("req-1", cost=400))
        assert admission.available("acme", admission.clock_ms()) == 600
        await event_log.publish(
            UsageRecorded(
                event_id="req-1",
                tenant_id="acme",
                amount=250,
                occurred_at=T0 + 1,
                model="m",
            )
        )
        await admission.finish(reservation, 250)
        await step.run()
        await eventually(lambda: admission.holds.open_count() == 0)
        assert view.balance("acme").balance == 750
        assert admission.available("acme", admission.clock_ms()) == 750
        await eventually(
            lambda: view.metrics.view_lag_records.labels(topic=event_log.topics.events)._value.get() == 0
        )
    finally:
        await runtime.stop()
