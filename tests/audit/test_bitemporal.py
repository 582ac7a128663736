"""Bitemporal queries: the balance at event time T as the ledger knew it at knowledge time K (the log's
append time of each event). The issue's case: a usage for 1 November arrives on 3 November; the balance
at 1 November as known on 2 November is the old one, as known on 4 November the new one."""

from __future__ import annotations

from datetime import UTC, datetime

from ledger.codec import encode_event
from ledger.events import CreditGranted, UsageRecorded
from streams.processor import LedgerProcessor
from streams.records import LogRecord
from tests.admin.conftest import TOPICS, admin_app, archive_records, client, clock, publisher  # noqa: F401
from tests.audit.test_chain import DictState, policy


def ms(day: str) -> int:
    return int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() * 1000)


async def test_a_late_usage_changes_the_past_only_from_when_it_was_known(client, session_factory):  # noqa: F811
    tenant_id = (await client.post("/admin/v1/tenants", json={"name": "Acme", "tier": "pro"})).json()[
        "tenant_id"
    ]
    grant = CreditGranted(
        event_id="g1",
        tenant_id=tenant_id,
        grant_id="g1",
        amount=1_000,
        effective_at=ms("2026-10-01"),
        expires_at=None,
    )
    usage = UsageRecorded(
        event_id="u1",
        tenant_id=tenant_id,
        amount=300,
        occurred_at=ms("2026-11-01T12:00:00"),
        model="tollgate-tiny",
    )
    records = [
        LogRecord(TOPICS.events, 0, 0, tenant_id.encode(), encode_event(grant), ms("2026-10-01")),
        LogRecord(TOPICS.events, 0, 1, tenant_id.encode(), encode_event(usage), ms("2026-11-03")),  # late
    ]
    entries = LedgerProcessor(DictState(), source_topic=TOPICS.events, checkpoints=policy()).process(
        0, records
    )
    entry_records = [  # each entry published when its event was folded: the grant's then, the usage's late
        LogRecord(TOPICS.entries, 0, index, record.key, record.value, ms(published))
        for index, record in enumerate(entries.entries)
        for published in ["2026-11-03" if b"usage_allocated" in record.value else "2026-10-01"]
    ]
    await archive_records(session_factory, records + entry_records)

    async def balance(**params) -> int:
        response = await client.get(f"/admin/v1/tenants/{tenant_id}/balance", params=params)
        assert response.status_code == 200, response.text
        return response.json()["balance"]

    t = ms("2026-11-01T18:00:00")
    assert await balance(at=t, as_known_at=ms("2026-11-02")) == 1_000  # the usage was not known yet
    assert await balance(at=t, as_known_at=ms("2026-11-04")) == 700
    assert await balance(at=t) == 700  # as known now
    assert await balance(at=ms("2026-10-15"), as_known_at=ms("2026-09-30")) == 0  # before the grant was known
    assert await balance(at=t, as_known_at="2026-11-02T00:00:00Z") == 1_000  # ISO 8601 too

    async def entry_types(**params) -> list[str]:
        response = await client.get(f"/admin/v1/tenants/{tenant_id}/entries", params=params)
        assert response.status_code == 200, response.text
        return [entry["type"] for entry in response.json()["entries"]]

    assert "usage_allocated" not in await entry_types(as_known_at=ms("2026-11-02"))
    assert "usage_allocated" in await entry_types(as_known_at=ms("2026-11-04"))

    async def november_statement(**params) -> dict:
        query = {"from": ms("2026-11-01"), "to": ms("2026-12-01"), **params}
        response = await client.get(f"/admin/v1/tenants/{tenant_id}/statements", params=query)
        assert response.status_code == 200, response.text
        return response.json()

    def consumed(statement: dict) -> int:
        return sum(line["credits"] for line in statement["consumption"])

    before, after = await november_statement(as_known_at=ms("2026-11-02")), await november_statement(
        as_known_at=ms("2026-11-04")
    )
    assert consumed(before) == 0 and before["closing"]["credits"] == 1_000  # the usage was not known yet
    assert consumed(after) == 300 and after["closing"]["credits"] == 700
    assert await november_statement() == after  # as known now
