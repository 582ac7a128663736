"""The console under test over ASGI: the admin API and the console on one app, a fresh real database, a
recording publisher and a settable clock (tests/admin/conftest.py's), and a helper that folds the events
the console published with the real ledger and projects the entries as the projector does."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence

import httpx
import msgspec
import pytest
from fastapi import FastAPI

from gateway.admin import AdminSettings
from gateway.console.mount import mount_console
from gateway.console.settings import ConsoleSettings
from ledger.entries import encode_entry
from ledger.events import Event
from ledger.tenant import TenantLedger
from streams.projector import rows_of_batch, write_batch
from streams.records import BalanceRecord, LogRecord
from tests.admin.conftest import ADMIN_TOKEN, TOPICS, RecordingPublisher, SettableClock
from tests.fixtures.admin_api import admin_api

__all__ = ["ADMIN_TOKEN", "RecordingPublisher", "SettableClock"]
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')
UNREACHABLE_WORKER = "http://127.0.0.1:9"


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def clock() -> SettableClock:
    return SettableClock(now_ms=1_793_491_200_000 + 10 * 86_400_000)  # 2026-11-11


def console_app(session_factory, publisher, clock, settings: ConsoleSettings | None = None) -> FastAPI:
    app = FastAPI()
    app.state.session_factory, app.state.event_log = session_factory, publisher
    admin_settings = AdminSettings()
    admin_api(session_factory, publisher, ADMIN_TOKEN, settings=admin_settings, clock=clock, app=app)
    mount_console(app, admin_settings, ADMIN_TOKEN, [UNREACHABLE_WORKER], settings, clock)
    return app


@pytest.fixture
def app(session_factory, publisher, clock) -> FastAPI:
    return console_app(session_factory, publisher, clock)


@pytest.fixture
async def browser(app) -> AsyncIterator[httpx.AsyncClient]:
    """A cookie-keeping client, not signed in."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://console.test"
    ) as client:
        yield client


async def sign_in(client: httpx.AsyncClient, token: str = ADMIN_TOKEN) -> httpx.Response:
    page = await client.get("/console/sign-in")
    csrf = CSRF_FIELD.search(page.text)[1]
    return await client.post("/console/sign-in", data={"token": token, "csrf": csrf})


@pytest.fixture
async def operator(browser) -> httpx.AsyncClient:
    response = await sign_in(browser)
    assert response.status_code == 303, response.text
    return browser


async def csrf_of(client: httpx.AsyncClient, path: str) -> str:
    return CSRF_FIELD.search((await client.get(path)).text)[1]


async def fold_and_project(session_factory, tenant_id: str, events: Sequence[Event], now_ms: int) -> None:
    """Fold the events with the real ledger and write its entries and balance as the projector does."""
    ledger = TenantLedger(tenant_id)
    entries = [entry for event in events for entry in ledger.apply(event)]
    records = [
        LogRecord(TOPICS.entries, 0, offset, tenant_id.encode(), encode_entry(entry))
        for offset, entry in enumerate(entries)
    ]
    balance = BalanceRecord(
        tenant_id=tenant_id,
        balance=ledger.balance_at(now_ms),
        overage=ledger.overage_at(now_ms),
        as_of=now_ms,
        applied_offset=len(events),
    )
    records.append(LogRecord(TOPICS.balances, 0, 0, tenant_id.encode(), msgspec.json.encode(balance)))
    async with session_factory() as session, session.begin():
        await write_batch(session, "test", rows_of_batch(TOPICS, records, now_ms=now_ms))
