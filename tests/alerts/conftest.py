"""Alerts and auto top-up under test: the embedded log on a fresh real database, its processor and
projector, a tenant, and the top-up agent."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from ledger.alerts import decode_alert
from ledger.codec import decode_event
from ledger.events import CreditGranted, TopUpRuleSet, UsageRecorded
from storage.database import build_async_engine, build_session_factory
from storage.tenants import Tenant
from streams.embedded_log import PostgresLog
from tests.streams.helpers import stream_settings

DAY_MS = 24 * 3600 * 1000


@pytest.fixture
async def database(database_url, database_settings):
    engine = build_async_engine(database_url, database_settings)
    yield engine, build_session_factory(engine)
    await engine.dispose()


@pytest.fixture
async def event_log(database, topic_prefix, tmp_path):
    engine, _ = database
    log = PostgresLog(engine, stream_settings("unused:9092", topic_prefix, tmp_path))
    await log.start()
    yield log
    await log.stop()


@pytest.fixture
def sessions(database):
    return database[1]


async def add_tenant(sessions, tenant_id: str) -> str:
    async with sessions() as session, session.begin():
        session.add(Tenant(tenant_id=tenant_id, name=tenant_id, tier="pro", created_at_ms=0))
    return tenant_id


def first_grant(tenant_id: str, amount: int = 1_000) -> CreditGranted:
    return CreditGranted(
        event_id=f"{tenant_id}-first", tenant_id=tenant_id, grant_id=f"{tenant_id}-g1", amount=amount,
        effective_at=0,
    )  # fmt: skip


def top_up_rule(tenant_id: str, **terms) -> TopUpRuleSet:
    values = dict(threshold=300, amount=500, price=1_200, currency="USD", monthly_count_max=2, set_at=0)
    values.update(terms)
    return TopUpRuleSet(event_id=f"{tenant_id}-auto", tenant_id=tenant_id, rule_id="auto", **values)


def usage(tenant_id: str, n: int, amount: int, at: int) -> UsageRecorded:
    return UsageRecorded(
        event_id=f"{tenant_id}-u{n}", tenant_id=tenant_id, amount=amount, occurred_at=at, model="m"
    )


async def published(event_log, topic: str) -> list:
    records = []
    for partition in range(event_log.partitions):
        records += await event_log.read(topic, partition, 0, 10_000)
    return records


async def alerts_on(event_log) -> list:
    return [decode_alert(r.value) for r in await published(event_log, event_log.topics.alerts)]


async def grants_on(event_log, tenant_id: str) -> list[CreditGranted]:
    events = [decode_event(r.value) for r in await published(event_log, event_log.topics.events)]
    return [e for e in events if isinstance(e, CreditGranted) and e.tenant_id == tenant_id]


async def grant_rows(sessions, tenant_id: str) -> list:
    from storage.tenants import Grant

    async with sessions() as session:
        return list(await session.scalars(select(Grant).where(Grant.tenant_id == tenant_id)))
