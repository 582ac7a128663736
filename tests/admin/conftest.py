"""The admin API under test: a FastAPI app with only the admin router, on a fresh real database, a
recording publisher (the events it was handed, in order) and a clock the test sets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.admin import AdminSettings
from ledger.codec import encode_event
from ledger.events import Event
from streams.projector import rows_of_batch, write_batch
from streams.records import LogRecord
from streams.topics import LedgerTopics
from tests.fixtures.admin_api import admin_api, admin_client

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
GRANT_AMOUNT_MAX = 1_000_000
ENTRIES_PAGE_SIZE_MAX = 50
TOPICS = LedgerTopics(
    events="ledger.events", entries="ledger.entries", balances="ledger.balances", dlq="ledger.dlq"
)


class PublisherDown(ConnectionError):
    pass


@dataclass
class RecordingPublisher:
    events: list[Event] = field(default_factory=list)
    appended: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # (topic, key, value)
    failures_left: int = 0  # the next N publish() calls raise
    delay_s: float = 0.0  # each publish() takes this long, as a broker round trip does
    topics: LedgerTopics = TOPICS

    async def publish(self, event: Event) -> None:
        if self.failures_left > 0:
            self.failures_left -= 1
            raise PublisherDown("broker away")
        await asyncio.sleep(self.delay_s)
        self.events.append(event)

    async def append(self, topic: str, key: bytes, value: bytes) -> None:
        self.appended.append((topic, key, value))


@dataclass
class SettableClock:
    now_ms: int = 1_700_000_000_000

    def __call__(self) -> int:
        return self.now_ms


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def clock() -> SettableClock:
    return SettableClock()


@pytest.fixture
def admin_app(session_factory, publisher, clock) -> FastAPI:
    settings = AdminSettings(
        grant_amount_max=GRANT_AMOUNT_MAX,
        entries_page_size_max=ENTRIES_PAGE_SIZE_MAX,
        entries_page_size_default=10,
    )
    return admin_api(session_factory, publisher, ADMIN_TOKEN, settings=settings, clock=clock)


@pytest.fixture
async def client(admin_app) -> AsyncIterator[httpx.AsyncClient]:
    async with admin_client(admin_app, ADMIN_TOKEN) as client:
        yield client


@pytest.fixture
async def tenant_id(client) -> str:
    response = await client.post("/admin/v1/tenants", json={"name": "Acme", "tier": "pro"})
    assert response.status_code == 201, response.text
    return response.json()["tenant_id"]


async def archive_events(
    session_factory: async_sessionmaker[AsyncSession], events: Sequence[Event], first_offset: int = 0
) -> None:
    """Write events into ledger_events the way the projector does (the projector's own row code)."""
    records = [
        LogRecord(TOPICS.events, 0, first_offset + index, event.tenant_id.encode(), encode_event(event))
        for index, event in enumerate(events)
    ]
    await archive_records(session_factory, records)


async def archive_records(
    session_factory: async_sessionmaker[AsyncSession], records: Sequence[LogRecord]
) -> None:
    async with session_factory() as session, session.begin():
        await write_batch(session, "test", rows_of_batch(TOPICS, records, now_ms=0))
