"""GET entries?since=&limit=: the tenant's ledger entries in the order recorded, paginated."""

import pytest

from ledger.entries import encode_entry
from ledger.events import CreditGranted, GrantVoided, UsageRecorded
from ledger.tenant import TenantLedger
from streams.records import LogRecord
from tests.admin.conftest import ENTRIES_PAGE_SIZE_MAX, TOPICS, archive_records

pytestmark = pytest.mark.postgres


def ledger_entries(tenant_id: str) -> list:
    """Real entries from the fold: allocations, a late usage's reallocation, a void, an expiry."""
    ledger = TenantLedger(tenant_id)
    events = [
        CreditGranted(
            event_id="e1", tenant_id=tenant_id, grant_id="g1", amount=100, effective_at=0, expires_at=5_000
        ),
        CreditGranted(
            event_id="e2", tenant_id=tenant_id, grant_id="g2", amount=100, effective_at=0, priority=1
        ),
        *[
            UsageRecorded(
                event_id=f"req-{n}",
                tenant_id=tenant_id,
                amount=30,
                occurred_at=1_000 + n,
                model="tiny",
                prompt_tokens=10 + n,
                completion_tokens=20,
            )
            for n in range(12)
        ],
        GrantVoided(event_id="e3", tenant_id=tenant_id, grant_id="g2", voided_at=4_000),
    ]
    entries = []
    for event in events:
        entries.extend(ledger.apply(event))
    entries.extend(ledger.advance_to(6_000))
    return entries


async def archive_entries(session_factory, entries, other_tenant_entries=()):
    records = [
        LogRecord(TOPICS.entries, 0, offset, entry.tenant_id.encode(), encode_entry(entry))
        for offset, entry in enumerate([*entries, *other_tenant_entries])
    ]
    await archive_records(session_factory, records)


async def test_entries_page_through_in_recorded_order(client, tenant_id, session_factory):
    entries = ledger_entries(tenant_id)
    await archive_entries(session_factory, entries, ledger_entries("someone-else"))

    seen, since, pages = [], 0, 0
    while True:
        response = await client.get(
            f"/admin/v1/tenants/{tenant_id}/entries", params={"since": since, "limit": 3}
        )
        assert response.status_code == 200, response.text
        page = response.json()
        seen.extend(page["entries"])
        since, pages = page["next_since"], pages + 1
        if not page["has_more"]:
            break

    assert pages == -(-len(entries) // 3)
    assert [entry["entry_id"] for entry in seen] == [entry.entry_id for entry in entries]
    assert all(entry["tenant_id"] == tenant_id for entry in seen)
    types = {entry["type"] for entry in seen}
    assert {"usage_allocated", "credit_voided", "credit_expired"} <= types
    usage = next(entry for entry in seen if entry["type"] == "usage_allocated")
    assert (
        usage["request_id"],
        usage["model"],
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["amount"],
    ) == (
        "req-0",
        "tiny",
        10,
        20,
        30,
    )
    again = await client.get(f"/admin/v1/tenants/{tenant_id}/entries", params={"since": since})
    assert again.json()["entries"] == [] and again.json()["next_since"] == since


async def test_entries_default_page_size_and_refusals(client, tenant_id, session_factory):
    await archive_entries(session_factory, ledger_entries(tenant_id))

    default = await client.get(f"/admin/v1/tenants/{tenant_id}/entries")
    too_many = await client.get(
        f"/admin/v1/tenants/{tenant_id}/entries", params={"limit": ENTRIES_PAGE_SIZE_MAX + 1}
    )
    zero = await client.get(f"/admin/v1/tenants/{tenant_id}/entries", params={"limit": 0})
    negative_since = await client.get(f"/admin/v1/tenants/{tenant_id}/entries", params={"since": -1})
    unknown = await client.get("/admin/v1/tenants/tn_missing/entries")

    assert len(default.json()["entries"]) == 10 and default.json()["has_more"]
    assert (too_many.status_code, too_many.json()["detail"]["field"]) == (422, "limit")
    assert (zero.status_code, zero.json()["detail"]["field"]) == (422, "limit")
    assert (negative_since.status_code, negative_since.json()["detail"]["field"]) == (422, "since")
    assert (unknown.status_code, unknown.json()["detail"]["field"]) == (404, "tenant_id")
