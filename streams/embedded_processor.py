"""The ledger processor over the embedded log (`make run`): the same `LedgerProcessor` as the faust
agent, driven by a loop that reads `ledger.events` from Postgres.

Exactly once here: a batch's outputs (entries, balances, dead letters appended to the log), its state
writes and its consumer offset commit in ONE Postgres transaction. A failed commit drops the cached
accounts, so the next step starts again from what is durable. Outputs never exist without the state that
produced them, so the processor stores no outbox here (`outbox=False`: nothing to send again); a sweep's
stream time is committed with its outputs like any batch's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert

from storage.embedded import ProcessorStateItem
from storage.projections import ProjectorOffset
from streams.embedded_log import PostgresLog
from streams.processor import LedgerProcessor, ProcessorOutput
from streams.replay import DictState
from streams.spool import OutgoingRecord

log = logging.getLogger(__name__)

PROCESSOR_NAME = "ledger-processor"


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


class EmbeddedProcessor:
    def __init__(
        self,
        event_log: PostgresLog,
        *,
        batch_max: int = 1_000,
        expiry_sweep_interval_ms: int = 5_000,
        expiry_grace_ms: int = 60_000,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.log = event_log
        self.batch_max = batch_max
        self.expiry_sweep_interval_ms = expiry_sweep_interval_ms
        self.expiry_grace_ms = expiry_grace_ms
        self.clock_ms = clock_ms
        self.state = DictState()
        self.processor = LedgerProcessor(self.state, source_topic=event_log.topics.events, outbox=False)
        self._next_offsets: dict[int, int] = {}

    async def start(self) -> None:
        """Load the durable state and offsets."""
        topic = self.log.topics.events
        async with self.log.engine.connect() as connection:
            rows = await connection.execute(
                select(ProcessorStateItem.key, ProcessorStateItem.value).where(
                    ProcessorStateItem.processor_name == PROCESSOR_NAME
                )
            )
            self.state.data = {bytes(key): bytes(value) for key, value in rows}
            offsets = await connection.execute(
                select(ProjectorOffset.partition, ProjectorOffset.next_offset).where(
                    ProjectorOffset.projector_name == PROCESSOR_NAME, ProjectorOffset.topic == topic
                )
            )
            self._next_offsets = {partition: next_offset for partition, next_offset in offsets}
        self.processor.forget()

    async def step(self) -> int:
        """Fold one bounded batch per partition; the number of records read."""
        topic = self.log.topics.events
        read = 0
        for partition in range(self.log.partitions):
            records = await self.log.read(
                topic, partition, self._next_offsets.get(partition, 0), self.batch_max
            )
            if not records:
                continue
            output = self.processor.process(partition, records)
            await self._commit(output, partition, records[-1].offset + 1)
            read += len(records)
        return read

    async def sweep_expiries(self) -> None:
        """Publish expiries that wall-clock time has passed, for tenants without new events."""
        now_ms = self.clock_ms() - self.expiry_grace_ms
        for partition, output in self.processor.expire_quiet(now_ms, self.log.partitions):
            await self._commit(output, partition, None)

    async def run(self, stop: asyncio.Event) -> None:
        last_sweep = 0.0
        topics = [self.log.topics.events]
        while not stop.is_set():
            mark = self.log.append_mark(topics)  # before reading: an append after it ends the wait below
            read = await self.step()
            if time.monotonic() - last_sweep >= self.expiry_sweep_interval_ms / 1000:
                await self.sweep_expiries()
                last_sweep = time.monotonic()
            if not read:
                await self.log.wait_for_append(
                    topics, mark, stop, timeout_s=self.expiry_sweep_interval_ms / 1000
                )

    async def _commit(self, output: ProcessorOutput, partition: int, next_offset: int | None) -> None:
        topics = self.log.topics
        outgoing = (
            [OutgoingRecord(topics.entries, r.key, r.value) for r in output.entries]
            + [OutgoingRecord(topics.balances, r.key, r.value) for r in output.balances]
            + [OutgoingRecord(topics.dlq, r.key, r.value) for r in output.dead_letters]
            + [OutgoingRecord(topics.checkpoints, r.key, r.value) for r in output.checkpoints]
            + [OutgoingRecord(topics.alerts, r.key, r.value) for r in output.alerts]
        )
        try:
            async with self.log.engine.begin() as connection:
                if outgoing:
                    await self.log.append_in(connection, outgoing)
                if output.state_writes:
                    statement = insert(ProcessorStateItem).values(
                        [
                            {"processor_name": PROCESSOR_NAME, "key": k, "value": v}
                            for k, v in output.state_writes
                        ]
                    )
                    await connection.execute(
                        statement.on_conflict_do_update(
                            index_elements=["processor_name", "key"], set_={"value": statement.excluded.value}
                        )
                    )
                if next_offset is not None:
                    statement = insert(ProjectorOffset).values(
                        projector_name=PROCESSOR_NAME,
                        topic=topics.events,
                        partition=partition,
                        next_offset=next_offset,
                    )
                    await connection.execute(
                        statement.on_conflict_do_update(
                            index_elements=["projector_name", "topic", "partition"],
                            set_={"next_offset": next_offset},
                        )
                    )
        except Exception:
            log.exception("embedded processor commit failed; reloading durable state")
            await self.start()
            raise
        self.state.write_all(output.state_writes)
        if next_offset is not None:
            self._next_offsets[partition] = next_offset
        if outgoing:
            await self.log.notify_appended()
