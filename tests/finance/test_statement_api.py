"""The admin API's finance routes on a real Postgres: paid grants are accepted and published with their
money terms; the statement read from the projection (SQL sums) is byte-identical to the pure statement of
the same entries on random histories (which asserts it ties out); the overage rate prices overage; a
period close publishes PeriodClosed for every tenant."""

from __future__ import annotations

import random

import pytest

from ledger.entries import encode_entry
from ledger.events import CreditGranted, GrantVoided, PeriodClosed, UsageRecorded
from ledger.statement import OverageRate, encode_statement, statement_of_entries
from ledger.tenant import TenantLedger
from streams.records import LogRecord
from tests.admin.conftest import TOPICS, archive_records
from tests.finance.test_statements import tokens_by_model

pytestmark = pytest.mark.postgres

MODELS = ("tiny", "large")


def random_history(tenant_id: str, seed: int, scale: int = 1) -> list:
    """A fold of random paid and promotional grants, voids, usage in any order, a close and late events;
    times are multiplied by `scale` (an hour spreads the history over days, so statements read whole days
    from the daily sums and the edges from the rows)."""
    rng = random.Random(seed)
    cached_rng = random.Random(f"cached-{seed}")  # its own draws: the rest of the history as before
    events = []
    for number in range(rng.randint(1, 4)):
        paid = rng.random() < 0.7
        effective_at = rng.randint(0, 500) * scale
        events.append(
            CreditGranted(
                event_id=f"ge-{number}",
                tenant_id=tenant_id,
                grant_id=f"{tenant_id}-g{number}",
                amount=rng.randint(10, 300),
                effective_at=effective_at,
                expires_at=rng.choice([None, effective_at + rng.randint(1, 600) * scale]),
                category="paid" if paid else "promotional",
                price=rng.randint(0, 99_999) if paid else None,
                currency=rng.choice(["USD", "EUR"]) if paid else None,
                reference=f"INV-{number}",
            )
        )
        if rng.random() < 0.2:
            events.append(
                GrantVoided(
                    event_id=f"v-{number}",
                    tenant_id=tenant_id,
                    grant_id=f"{tenant_id}-g{number}",
                    voided_at=rng.randint(0, 1_000) * scale,
                )
            )
    for number in range(rng.randint(0, 60)):
        prompt_tokens = rng.randint(0, 50)
        events.append(
            UsageRecorded(
                event_id=f"u-{number}",
                tenant_id=tenant_id,
                amount=rng.randint(0, 20),
                occurred_at=rng.randint(0, 1_000) * scale + rng.randint(0, scale - 1),
                model=rng.choice(MODELS),
                prompt_tokens=prompt_tokens,
                completion_tokens=rng.randint(0, 50),
                cached_prompt_tokens=cached_rng.choice([0, cached_rng.randint(0, prompt_tokens)]),
            )
        )
    rng.shuffle(events)
    events.insert(
        rng.randint(0, len(events)), PeriodClosed(event_id="c", tenant_id=tenant_id, closed_until=400 * scale)
    )
    ledger = TenantLedger(tenant_id)
    entries = []
    for event in events:
        entries += ledger.apply(event)
        if rng.random() < 0.2:
            entries += ledger.advance_to(rng.randint(0, 1_100) * scale)
    return entries + ledger.advance_to(1_200 * scale)


async def archive_entries(session_factory, entries) -> None:
    records = [
        LogRecord(TOPICS.entries, 0, offset, entry.tenant_id.encode(), encode_entry(entry))
        for offset, entry in enumerate(entries)
    ]
    await archive_records(session_factory, records)


@pytest.mark.parametrize("scale", [1, 3_600_000])
@pytest.mark.parametrize("seed", range(6))
async def test_the_api_statement_is_the_pure_statement_of_the_projected_entries(
    client, tenant_id, session_factory, seed, scale
):
    entries = random_history(tenant_id, seed, scale)
    await archive_entries(session_factory, entries + random_history("someone-else", seed, scale))
    windows = [(0, 400), (400, 800), (0, 1_300), (250, 900), (37, 613)]
    for start, end in [(start * scale, end * scale) for start, end in windows] + [
        (scale // 3, 900 * scale + 7)
    ]:
        response = await client.get(
            f"/admin/v1/tenants/{tenant_id}/statements", params={"from": start, "to": end}
        )
        assert response.status_code == 200, response.text
        assert response.content == encode_statement(statement_of_entries(tenant_id, entries, start, end))
        cached = {line["key"]: line["cached_prompt_tokens"] for line in response.json()["consumption"]}
        expected = {model: tokens[2] for model, tokens in tokens_by_model(entries, start, end).items()}
        assert {k: v for k, v in cached.items() if v} == {k: v for k, v in expected.items() if v}


async def test_a_paid_grant_is_published_with_its_money_terms_and_the_overage_rate_prices_overage(
    client, tenant_id, session_factory, publisher
):
    body = {
        "amount": 1_000,
        "effective_at": 0,
        "category": "paid",
        "price": 5_000,
        "currency": "USD",
        "reference": "INV-42",
    }
    response = await client.post(
        f"/admin/v1/tenants/{tenant_id}/grants", json=body, headers={"Idempotency-Key": "k1"}
    )
    assert response.status_code == 201, response.text
    assert {k: response.json()[k] for k in ("category", "price", "currency", "reference")} == {
        "category": "paid",
        "price": 5_000,
        "currency": "USD",
        "reference": "INV-42",
    }
    (granted,) = publisher.events
    assert (granted.category, granted.price, granted.currency, granted.reference) == (
        "paid",
        5_000,
        "USD",
        "INV-42",
    )
    refused = await client.post(
        f"/admin/v1/tenants/{tenant_id}/grants",
        json={**body, "price": None},
        headers={"Idempotency-Key": "k2"},
    )
    assert refused.status_code == 422 and refused.json()["detail"]["field"] == "price"

    ledger = TenantLedger(tenant_id)
    entries = ledger.apply(granted)
    entries += ledger.apply(
        UsageRecorded(event_id="u", tenant_id=tenant_id, amount=1_300, occurred_at=10, model="tiny")
    )
    await archive_entries(session_factory, entries)
    unpriced = (
        await client.get(f"/admin/v1/tenants/{tenant_id}/statements", params={"from": 0, "to": 100})
    ).json()
    assert unpriced["overage"] == {"credits": 300, "priced": None, "currency": None}
    rate = {"rate_per_million_credits": 2_000_000, "currency": "USD"}
    assert (await client.put(f"/admin/v1/tenants/{tenant_id}/overage-rate", json=rate)).status_code == 200
    response = await client.get(f"/admin/v1/tenants/{tenant_id}/statements", params={"from": 0, "to": 100})
    assert response.json()["overage"] == {"credits": 300, "priced": 600, "currency": "USD"}
    assert response.content == encode_statement(
        statement_of_entries(tenant_id, entries, 0, 100, OverageRate(2_000_000, "USD"))
    )
    assert response.json()["consumption"][0]["money"] == [["USD", 5_000]]


async def test_closing_a_period_publishes_period_closed_for_every_tenant(client, tenant_id, publisher):
    other = (await client.post("/admin/v1/tenants", json={"name": "Other", "tier": "pro"})).json()[
        "tenant_id"
    ]
    response = await client.post("/admin/v1/periods/close", json={"until": "2026-12-01T00:00:00Z"})
    assert response.status_code == 200, response.text
    assert sorted(response.json()["tenants"]) == sorted([tenant_id, other])
    closes = [e for e in publisher.events if isinstance(e, PeriodClosed)]
    assert sorted(e.tenant_id for e in closes) == sorted([tenant_id, other])
    assert {e.closed_until for e in closes} == {1_796_083_200_000}
    again = await client.post("/admin/v1/periods/close", json={"until": 1_796_083_200_000})
    assert {e.event_id for e in publisher.events if isinstance(e, PeriodClosed)} == {
        e.event_id for e in closes
    }
    assert again.status_code == 200


async def test_a_closed_november_answers_the_same_bytes_after_a_late_october_usage(
    client, tenant_id, session_factory
):
    """Through Postgres and the API: close November, project a late October usage, and November's
    statement is byte-identical while December carries the adjustment naming the late event."""
    from tests.finance.test_statements import DEC, JAN, NOV, OCT_15

    ledger = TenantLedger(tenant_id)
    grant = CreditGranted(
        event_id="g-event", tenant_id=tenant_id, grant_id="g", amount=1_000, effective_at=OCT_15 - 1,
        category="paid", price=50_000, currency="USD",
    )  # fmt: skip
    entries = ledger.apply(grant)
    entries += ledger.apply(
        UsageRecorded(event_id="u-nov", tenant_id=tenant_id, amount=100, occurred_at=NOV + 5, model="m")
    )
    entries += ledger.apply(PeriodClosed(event_id="close", tenant_id=tenant_id, closed_until=DEC))
    await archive_entries(session_factory, entries)
    path = f"/admin/v1/tenants/{tenant_id}/statements"
    november = (await client.get(path, params={"from": NOV, "to": DEC})).content
    late = ledger.apply(
        UsageRecorded(event_id="u-late", tenant_id=tenant_id, amount=10, occurred_at=OCT_15, model="m")
    )
    await archive_entries(session_factory, entries + late)
    assert (await client.get(path, params={"from": NOV, "to": DEC})).content == november
    december = (await client.get(path, params={"from": DEC, "to": JAN})).json()
    (adjustment,) = december["adjustments"]
    assert (adjustment["cause_event_id"], adjustment["own_time"], adjustment["booked_at"]) == (
        "u-late",
        OCT_15,
        DEC,
    )
    assert (adjustment["credits"], adjustment["money"]) == (-10, [["USD", -500]])
    assert (december["opening"]["credits"], december["closing"]["credits"]) == (900, 890)
