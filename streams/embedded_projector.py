"""The Postgres projector over the embedded log: the same rows and the same exactly-once transaction
(`streams.projector.rows_of_batch` / `write_batch`) as over Kafka, reading the log from Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import time

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from streams.embedded_log import PostgresLog
from streams.projector import rows_of_batch, stored_offsets, write_batch

PROJECTOR_NAME = "postgres-projector"


class EmbeddedProjector:
    def __init__(
        self, event_log: PostgresLog, session_factory: async_sessionmaker[AsyncSession], *, batch_max: int = 1_000
    ) -> None:
        self.log = event_log
        self.session_factory = session_factory
        self.batch_max = batch_max

    async def step(self) -> int:
        topics = self.log.topics
        async with self.session_factory() as session:
            offsets = await stored_offsets(session, PROJECTOR_NAME)
        records = []
        for topic in (topics.events, topics.entries, topics.balances):
            for partition in range(self.log.partitions):
                records += await self.log.read(topic, partition, offsets.get((topic, partition), 0), self.batch_max)
        if not records:
            return 0
        rows = rows_of_batch(topics, records, int(time.time() * 1000))
        async with self.session_factory() as session, session.begin():
            await write_batch(session, PROJECTOR_NAME, rows)
        return len(records)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not await self.step():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=0.1)
