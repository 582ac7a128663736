"""`python -m tests.webhooks.dispatcher_process DATABASE_URL TOPIC_PREFIX SPOOL_DIR`: a webhook dispatcher
over the embedded log in its own OS process, for the tests that kill it -9 (TOLLGATE_WEBHOOK_* settings)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from storage.database import DatabaseSettings, build_async_engine, build_session_factory
from streams.embedded_log import PostgresLog
from streams.webhooks.dispatcher import WebhookDispatcher
from streams.webhooks.settings import WebhookSettings
from tests.streams.helpers import stream_settings


async def main(database_url: str, topic_prefix: str, spool_dir: Path) -> None:
    engine = build_async_engine(database_url, DatabaseSettings(database_url=database_url))
    event_log = PostgresLog(engine, stream_settings("unused:9092", topic_prefix, spool_dir))
    await event_log.start()
    print("dispatcher started", flush=True)
    await WebhookDispatcher(event_log, build_session_factory(engine), WebhookSettings()).run(asyncio.Event())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
