"""The projector writes the point-in-time snapshots: events appended to the embedded log (knowledge time =
its append time) and archived by the projector leave a tenant's snapshots every `snapshot_every_events`
input events, at most `SNAPSHOTS_PER_BATCH_MAX` a batch, and `balance?at=T&as_known_at=K` answers from
them, equal to the full fold of the events known by K (late usage included)."""

from __future__ import annotations

import asyncio
import random

from sqlalchemy import select

import gateway.admin.queries as queries
from ledger.events import CreditGranted, UsageRecorded
from ledger.tenant import TenantLedger
from storage.database import build_async_engine, build_session_factory
from storage.projections import LedgerEvent
from storage.snapshots import AuditSnapshot
from streams.embedded_log import PostgresLog
from streams.embedded_projector import EmbeddedProjector
from streams.snapshotter import SNAPSHOTS_PER_BATCH_MAX
from tests.streams.helpers import stream_settings

TENANT = "snap-writer"
EVERY_EVENTS = 20
USAGE_EVENTS = 180
EVENTS_MAX = 10_000


def history(rng: random.Random) -> list:
    events: list = [
        CreditGranted(event_id="g1", tenant_id=TENANT, grant_id="g1", amount=9_000, effective_at=0)
    ]
    for index in range(USAGE_EVENTS):
        if index == 90:
            events.append(
                CreditGranted(
                    event_id="g2",
                    tenant_id=TENANT,
                    grant_id="g2",
                    amount=400,
                    effective_at=300,
                    expires_at=800,
                )
            )
        at = rng.randrange(0, 1_000)  # in any order: many arrive after later usage (late)
        events.append(
            UsageRecorded(
                event_id=f"u{index}", tenant_id=TENANT, amount=rng.randrange(1, 60), occurred_at=at, model="m"
            )
        )
    return events


async def test_the_projector_writes_snapshots_and_answers_use_them(
    database_url, database_settings, topic_prefix, tmp_path, monkeypatch
):
    engine = build_async_engine(database_url, database_settings)
    log = PostgresLog(engine, stream_settings("unused:9092", topic_prefix, tmp_path))
    await log.start()
    session_factory = build_session_factory(engine)
    rng = random.Random(4)
    projector = EmbeddedProjector(log, session_factory, batch_max=15, snapshot_every_events=EVERY_EVENTS)
    written_per_batch: list[int] = []
    after_batch = projector.snapshotter.after_batch

    async def counted(event_rows):
        written_per_batch.append(await after_batch(event_rows))
        return written_per_batch[-1]

    monkeypatch.setattr(projector.snapshotter, "after_batch", counted)
    try:
        events = history(rng)
        for index, event in enumerate(events):
            await log.publish(event)
            if index % 7 == 6:
                await asyncio.sleep(0.002)  # knowledge times in several milliseconds
                while await projector.step():
                    pass
        while await projector.step():
            pass

        async with session_factory() as session:
            cuts = (
                await session.scalars(
                    select(AuditSnapshot.known_through_ms)
                    .where(AuditSnapshot.tenant_id == TENANT)
                    .order_by(AuditSnapshot.known_through_ms)
                )
            ).all()
            known = (
                await session.execute(
                    select(LedgerEvent.event_id, LedgerEvent.known_at_ms).where(
                        LedgerEvent.tenant_id == TENANT
                    )
                )
            ).all()
        assert len(cuts) >= len(events) // EVERY_EVENTS - 2, cuts  # the projector wrote them, none by hand
        assert max(written_per_batch) <= SNAPSHOTS_PER_BATCH_MAX
        known_at = dict(known)
        assert all(known_at[event.event_id] for event in events), "every event has its append time"

        from_snapshot: list[int] = []
        original = queries._balance_from_snapshot

        async def spy(session, snapshot, *args):
            from_snapshot.append(snapshot.known_through_ms)
            return await original(session, snapshot, *args)

        monkeypatch.setattr(queries, "_balance_from_snapshot", spy)
        times = sorted(set(known_at.values()))
        for _ in range(60):
            at, known_by = rng.randrange(0, 1_100), rng.choice(times[len(times) // 4 :])
            ledger = TenantLedger(TENANT)
            for event in events:
                if known_at[event.event_id] <= known_by:
                    ledger.apply(event)
            async with session_factory() as session:
                view = await queries.balance_at(session, TENANT, at, EVENTS_MAX, known_by)
            assert (view.balance, view.overage) == (ledger.balance_at(at), ledger.overage_at(at)), (
                at,
                known_by,
            )
            assert from_snapshot and from_snapshot[-1] <= known_by, "answered from a snapshot known by K"
        assert len(from_snapshot) == 60
    finally:
        await log.stop()
        await engine.dispose()
