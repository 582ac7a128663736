"""Snapshots through Postgres and the admin API: `streams.snapshotter.snapshot_tenant` writes them from the
archive, `GET .../balance?at=T&as_known_at=K` answers from them, equal to the full fold's answer
(late usage included: known hundreds of milliseconds after its event time)."""

from __future__ import annotations

import random

from sqlalchemy import func, select

import storage.snapshots as snapshots
from ledger.codec import encode_event
from ledger.events import CreditGranted, UsageRecorded
from ledger.tenant import TenantLedger
from storage.snapshots import AuditSnapshot
from streams.records import LogRecord
from streams.snapshotter import snapshot_tenant
from tests.admin.conftest import TOPICS, admin_app, archive_records, client, clock, publisher  # noqa: F401


async def test_snapshot_answers_equal_the_full_fold(client, session_factory, monkeypatch):  # noqa: F811
    monkeypatch.setattr(snapshots, "USAGE_STRIDE_TIMES", 3)
    tenant_id = (await client.post("/admin/v1/tenants", json={"name": "Snap", "tier": "pro"})).json()[
        "tenant_id"
    ]
    rng = random.Random(15)
    history = [
        (CreditGranted(event_id="g1", tenant_id=tenant_id, grant_id="g1", amount=5_000, effective_at=0), 1),
        (
            CreditGranted(
                event_id="g2",
                tenant_id=tenant_id,
                grant_id="g2",
                amount=700,
                effective_at=400,
                expires_at=900,
            ),
            420,
        ),
    ]
    for index in range(60):
        at = rng.randrange(0, 1_000)
        late = rng.random() < 0.2
        usage = UsageRecorded(
            event_id=f"u{index}", tenant_id=tenant_id, amount=rng.randrange(1, 90), occurred_at=at, model="m"
        )
        history.append((usage, at + (rng.randrange(300, 800) if late else rng.randrange(0, 5))))
    records = [
        LogRecord(TOPICS.events, 0, offset, tenant_id.encode(), encode_event(event), known)
        for offset, (event, known) in enumerate(history)
    ]
    await archive_records(session_factory, records)
    assert await snapshot_tenant(session_factory, tenant_id, 7, now_ms=0) >= 5
    async with session_factory() as session:
        assert await session.scalar(select(func.count()).where(AuditSnapshot.tenant_id == tenant_id)) >= 5

    async def check(queries: int) -> None:
        for _ in range(queries):
            at, known_by = rng.randrange(0, 1_100), rng.randrange(0, 1_900)
            ledger = TenantLedger(tenant_id)
            for event, known in history:
                if known <= known_by:
                    ledger.apply(event)
            response = await client.get(
                f"/admin/v1/tenants/{tenant_id}/balance", params={"at": at, "as_known_at": known_by}
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert (body["balance"], body["overage"]) == (ledger.balance_at(at), ledger.overage_at(at))
            assert [block["remaining"] for block in body["blocks"]] == [
                block.remaining for block in ledger.blocks_at(at)
            ]

    await check(80)
