"""The Postgres projector over the embedded log: the same rows and the same exactly-once transaction
(`streams.projector.project_records`: dead letters included) as over Kafka, reading the log from Postgres."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from streams.embedded_log import PostgresLog
from streams.fold_tracing import FoldSpans
from streams.projector import project_records, stored_offsets, wall_clock_ms
from streams.snapshotter import Snapshotter
from tollgate.tracing_setup import tracing_enabled

PROJECTOR_NAME = "postgres-projector"


class EmbeddedProjector:
    def __init__(
        self,
        event_log: PostgresLog,
        session_factory: async_sessionmaker[AsyncSession],
        *,
        batch_max: int = 1_000,
        snapshot_every_events: int | None = None,  # None: TOLLGATE_AUDIT_SNAPSHOT_EVERY_EVENTS
    ) -> None:
        self.log = event_log
        self.session_factory = session_factory
        self.batch_max = batch_max
        self.snapshotter = Snapshotter.of(session_factory, snapshot_every_events, wall_clock_ms)
        self.fold_spans: FoldSpans | None = None  # made at the first batch with tracing on

    async def step(self) -> int:
        topics = self.log.topics
        async with self.session_factory() as session:
            offsets = await stored_offsets(session, PROJECTOR_NAME)
        records = []
        for topic in (topics.events, topics.entries, topics.balances, topics.checkpoints):
            for partition in range(self.log.partitions):
                records += await self.log.read(
                    topic, partition, offsets.get((topic, partition), 0), self.batch_max
                )
        if not records:
            return 0
        rows = await project_records(
            self.session_factory, PROJECTOR_NAME, topics, records, int(time.time() * 1000), self.log
        )
        await self.snapshotter.after_batch(rows.events.values())  # the point-in-time snapshots it made due
        if tracing_enabled():  # per batch: a provider installed after start counts (tollgate dev's gateway)
            self.fold_spans = self.fold_spans or FoldSpans()
            self.fold_spans.after_batch(rows.events.values(), rows.entries.values())
        return len(records)

    async def run(self, stop: asyncio.Event) -> None:
        names = self.log.topics
        topics = [names.events, names.entries, names.balances, names.checkpoints]
        while not stop.is_set():
            mark = self.log.append_mark(topics)  # before reading: an append after it ends the wait below
            if not await self.step():
                await self.log.wait_for_append(topics, mark, stop)
