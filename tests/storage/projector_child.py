"""Runs the projector in a child process and SIGKILLs it in the middle of batch N: after the batch's
rows and offsets are written, before the transaction commits. Used by test_projector_kafka.py.

    python -m tests.storage.projector_child BOOTSTRAP TOPIC_PREFIX DATABASE_URL NAME BATCH_MAX CRASH_BATCH
"""

import asyncio
import os
import signal
import sys

from storage.database import DatabaseSettings, build_async_engine, build_session_factory
from streams.projector import Projector, ProjectorSettings
from streams.settings import StreamSettings
from streams.topics import LedgerTopics
from tests.storage.dead_letters import RecordingDeadLetters

STEPS_MAX = 1_000


async def main(
    bootstrap: str, prefix: str, database_url: str, name: str, batch_max: int, crash_batch: int
) -> None:
    engine = build_async_engine(database_url, DatabaseSettings(database_url=database_url, pool_size_max=1))
    batches = 0

    async def kill_on_crash_batch(records) -> None:
        nonlocal batches
        batches += 1
        if batches == crash_batch:
            os.kill(os.getpid(), signal.SIGKILL)

    projector = Projector(
        settings=ProjectorSettings(name=name, batch_records_max=batch_max, poll_timeout_ms=200),
        topics=LedgerTopics.from_settings(StreamSettings(topic_prefix=prefix)),
        bootstrap_servers=bootstrap,
        session_factory=build_session_factory(engine),
        dead_letter_log=RecordingDeadLetters(),
        before_commit=kill_on_crash_batch,
    )
    async with projector:
        for _ in range(STEPS_MAX):
            await projector.step()
    raise SystemExit(f"the projector ran {STEPS_MAX} steps without reaching batch {crash_batch}")


if __name__ == "__main__":
    bootstrap, prefix, database_url, name, batch_max, crash_batch = sys.argv[1:]
    asyncio.run(main(bootstrap, prefix, database_url, name, int(batch_max), int(crash_batch)))
