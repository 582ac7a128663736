"""The auto top-up over a real database: the fold decides (a top_up alert on ledger.alerts), the agent grants
through the admin command path, the grant is folded and projected like any other with its source; a
redelivered alert, a second agent, or an agent killed -9 between the decision and the grant never grant
twice."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select

from gateway.admin.settings import AdminSettings
from storage.finance import tenant_statement
from storage.projections import LedgerEntry
from streams.embedded_processor import EmbeddedProcessor
from streams.embedded_projector import EmbeddedProjector
from tests.alerts.conftest import (
    add_tenant,
    alerts_on,
    first_grant,
    grant_rows,
    grants_on,
    top_up_rule,
    usage,
)
from tests.fixtures.processes import ComponentProcess
from tollgate.topup_agent import CONSUMER_NAME, TopUpAgent, idempotency_key

pytestmark = pytest.mark.postgres

WAIT_S = 30.0


async def fold(event_log, sessions) -> None:
    """Everything on the log folded and projected."""
    processor = EmbeddedProcessor(event_log)
    await processor.start()
    projector = EmbeddedProjector(event_log, sessions)
    while await processor.step() + await projector.step():
        pass


async def below_threshold(event_log, sessions, tenant_id: str) -> None:
    for event in (first_grant(tenant_id), top_up_rule(tenant_id), usage(tenant_id, 1, 800, 1_000)):
        await event_log.publish(event)
    await fold(event_log, sessions)


async def test_a_top_up_is_granted_once_with_its_source_and_folded(event_log, sessions):
    tenant = await add_tenant(sessions, "acme")
    await below_threshold(event_log, sessions, tenant)
    [alert] = await alerts_on(event_log)
    assert (alert.kind, alert.balance, alert.top_up_amount, alert.top_up_price) == ("top_up", 200, 500, 1_200)

    agent = TopUpAgent(event_log, sessions, AdminSettings())
    assert await agent.step() == 1 and agent.granted == 1
    second = TopUpAgent(event_log, sessions, AdminSettings(), consumer_name=f"{CONSUMER_NAME}-other")
    assert await second.step() == 1 and second.granted == 0  # another agent: the same grant, not a new one
    await agent.handle((await _alert_records(event_log))[0])  # a redelivery
    [grant] = [g for g in await grants_on(event_log, tenant) if g.grant_id != f"{tenant}-g1"]
    assert (grant.amount, grant.category, grant.price, grant.currency) == (500, "paid", 1_200, "USD")
    assert grant.reference == "top-up rule auto, crossing 1" and grant.effective_at == alert.fired_at
    [row] = [r for r in await grant_rows(sessions, tenant) if r.idempotency_key == idempotency_key(alert)]
    assert row.grant_id == grant.grant_id

    await fold(event_log, sessions)
    async with sessions() as session:
        recorded = [
            e.payload
            for e in await session.scalars(select(LedgerEntry).where(LedgerEntry.tenant_id == tenant))
            if e.entry_type == "grant_recorded" and e.payload["grant_id"] == grant.grant_id
        ]
    assert [(p["reference"], p["price"]) for p in recorded] == [("top-up rule auto, crossing 1", 1_200)]
    async with sessions() as session:
        statement = await tenant_statement(session, tenant, 0, alert.fired_at + 1)
    paid = [(line.credits, [(m.currency, m.amount) for m in line.money]) for line in statement.grants]
    assert (500, [("USD", 1_200)]) in paid, "the statement's paid grants carry the top-up and its price"
    assert [a.kind for a in await alerts_on(event_log)] == ["top_up"], "the balance recovered: nothing more"


async def _alert_records(event_log):
    records = []
    for partition in range(event_log.partitions):
        records += await event_log.read(event_log.topics.alerts, partition, 0, 100)
    return records


@pytest.mark.parametrize("kill_at", ["before_publish", "after_publish"])
async def test_an_agent_killed_between_decision_and_grant_grants_exactly_once_after_a_restart(
    event_log, sessions, database_url, topic_prefix, tmp_path, kill_at
):
    tenant = await add_tenant(sessions, "acme")
    await below_threshold(event_log, sessions, tenant)
    [alert] = await alerts_on(event_log)
    args = [database_url, topic_prefix, str(tmp_path)]
    killed = ComponentProcess("tests.alerts.agent_process", {}, tmp_path / "agent.log", [*args, kill_at])
    killed.start()
    assert killed.process.wait(timeout=WAIT_S) == -9, killed.log_tail()
    rows = [r for r in await grant_rows(sessions, tenant) if r.idempotency_key == idempotency_key(alert)]
    assert len(rows) == 1, "the grant was recorded before the kill"
    on_log = len(await grants_on(event_log, tenant)) - 1
    assert on_log == (1 if kill_at == "after_publish" else 0)

    restarted = ComponentProcess("tests.alerts.agent_process", {}, tmp_path / "agent2.log", [*args, "never"])
    restarted.start()
    try:
        async with asyncio.timeout(WAIT_S):
            while len(await grants_on(event_log, tenant)) < 2 or not await _committed(sessions):
                assert restarted.alive(), restarted.log_tail()
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # time for a second grant, were there one
    finally:
        restarted.stop()
    top_ups = [g for g in await grants_on(event_log, tenant) if g.grant_id != f"{tenant}-g1"]
    # after_publish: the restart publishes the unmarked grant's event again, the same event (a duplicate
    # every consumer drops by its id); never another grant
    assert {(g.grant_id, g.event_id) for g in top_ups} == {(rows[0].grant_id, rows[0].event_id)}
    assert len(await grant_rows(sessions, tenant)) == 1
    await fold(event_log, sessions)
    async with sessions() as session:
        recorded = [
            e.payload["amount"]
            for e in await session.scalars(select(LedgerEntry).where(LedgerEntry.tenant_id == tenant))
            if e.entry_type == "grant_recorded" and e.payload["grant_id"] == rows[0].grant_id
        ]
    assert recorded == [500], "folded once"


async def _committed(sessions) -> bool:
    from storage.projections import ProjectorOffset

    async with sessions() as session:
        offsets = await session.scalars(
            select(ProjectorOffset.next_offset).where(ProjectorOffset.projector_name == CONSUMER_NAME)
        )
        return sum(offsets) > 0
