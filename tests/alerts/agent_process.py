"""`python -m tests.alerts.agent_process DATABASE_URL TOPIC_PREFIX SPOOL_DIR KILL_AT`: the top-up agent over
the embedded log in its own OS process, SIGKILLing itself at a point of its first grant (KILL_AT):
`before_publish` (the grant is recorded in Postgres, not yet on the log), `after_publish` (on the log, its
offset not committed), or `never`."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from gateway.admin.settings import AdminSettings
from storage.database import DatabaseSettings, build_async_engine, build_session_factory
from streams.embedded_log import PostgresLog
from tests.streams.helpers import stream_settings
from tollgate.topup_agent import TopUpAgent


class KillingPublisher:
    """The event log as the agent's publisher, killing this process -9 at `kill_at`."""

    def __init__(self, event_log: PostgresLog, kill_at: str) -> None:
        self.log = event_log
        self.topics = event_log.topics
        self.kill_at = kill_at

    async def publish(self, event):
        if self.kill_at == "before_publish":
            os.kill(os.getpid(), signal.SIGKILL)
        position = await self.log.publish(event)
        if self.kill_at == "after_publish":
            os.kill(os.getpid(), signal.SIGKILL)
        return position

    async def append(self, topic: str, key: bytes, value: bytes):
        return await self.log.append(topic, key, value)


async def main(database_url: str, topic_prefix: str, spool_dir: Path, kill_at: str) -> None:
    engine = build_async_engine(database_url, DatabaseSettings(database_url=database_url))
    event_log = PostgresLog(engine, stream_settings("unused:9092", topic_prefix, spool_dir))
    await event_log.start()
    print("top-up agent started", flush=True)
    publisher = KillingPublisher(event_log, kill_at)
    agent = TopUpAgent(event_log, build_session_factory(engine), AdminSettings(), publisher=publisher)
    await agent.run(asyncio.Event())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]))
