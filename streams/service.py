"""What every long-running consumer of the distributed deployment does around its own work: wait for and
migrate the database, create the ledger topics that are missing, open a Kafka log, run, close; and, as a
process, run until SIGINT or SIGTERM. Used by the projector, the webhook dispatcher and the top-up agent.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.database import DatabaseSettings, build_async_engine, build_session_factory, prepare_database
from streams.log import KafkaLog
from streams.settings import StreamSettings
from streams.topics import ensure_topics, ledger_topic_specs

Work = Callable[[KafkaLog, async_sessionmaker[AsyncSession]], Awaitable[None]]


async def with_database_and_log(
    database_settings: DatabaseSettings, stream_settings: StreamSettings, work: Work
) -> None:
    """Wait for and migrate the database, create missing topics, then `work(log, sessions)`."""
    database_url = await asyncio.to_thread(prepare_database, database_settings)
    await ensure_topics(
        stream_settings.kafka_bootstrap_servers,
        ledger_topic_specs(stream_settings),
        request_timeout_ms=stream_settings.admin_request_timeout_ms,
    )
    engine = build_async_engine(database_url, database_settings)
    event_log = KafkaLog(stream_settings)
    try:
        await event_log.start()
        await work(event_log, build_session_factory(engine))
    finally:
        await event_log.stop()
        await engine.dispose()


def run_until_signalled(run: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """A process's main: logging configured, then `run(stop)` with `stop` set by SIGINT or SIGTERM."""
    from tollgate.logging_setup import configure_logging

    configure_logging()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signal_number, stop.set)
        await run(stop)

    asyncio.run(main())
