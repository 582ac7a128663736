"""bench.console: the console's tenant page for a tenant with 100,000 history entries and 50 credit blocks.

The tenant's events (50 grants over 50 days, some expiring or voided, and 100k usage events) are folded by
the real ledger (TenantLedger); the entries and their movements are written with COPY as the projector's
rows look (bench.finance's loader columns and storage.finance's helpers), the tenant, its grants and its
balance through the ORM. Then, through the gateway's console over ASGI (a signed-in session):

- page_ms: the tenant page's first screen (GET /console/tenants/{id}: balance cards, grants, the first
  history page with the balance after each row, keys), p50 / p99 over N requests; target p99 <= 300 ms
- burndown_ms: the burn-down chart's JSON at 1,200 px (50 series downsampled on the server to at most the
  chart's points), p50 / p99; and usage_ms: the usage-per-day chart's JSON

Prints one JSON line. BENCH_CONSOLE_USAGE overrides the 100k (for a quick run).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import msgspec
import psycopg
from fastapi import FastAPI

from bench.finance import DAYS_SQL, ENTRY_COLUMNS, GRANT_COLUMNS, MOVEMENT_COLUMNS, _copy
from gateway.admin import AdminSettings
from gateway.console.mount import mount_console
from gateway.console.settings import ConsoleSettings
from ledger.entries import GrantRecorded, encode_entry
from ledger.events import CreditGranted, GrantVoided, UsageRecorded
from ledger.statement import movements
from ledger.tenant import TenantLedger
from storage.database import (
    DatabaseSettings,
    build_async_engine,
    build_session_factory,
    libpq_url,
    start_embedded_postgres,
    upgrade_database,
)
from storage.finance import entry_finance_columns, movement_values
from storage.projections import Balance
from storage.tenants import Grant, Tenant

USAGE_EVENTS = int(os.environ.get("BENCH_CONSOLE_USAGE", 100_000))
BLOCKS = 50
REQUESTS = 60
WARMUP = 5
PAGE_TARGET_MS = 300
CHART_WIDTH_PX = 1_200
DAY_MS = 86_400_000
START = 1_793_491_200_000  # 2026-11-01T00:00:00Z
NOW = START + BLOCKS * DAY_MS
TENANT = "bench-console"
TOKEN = "bench-console-admin-token-0123456789abcdef"
MODELS = ("tiny", "small", "medium", "large")
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def events() -> list:
    grants = [
        CreditGranted(
            event_id=f"ev-g{n}", tenant_id=TENANT, grant_id=f"g{n:02d}", amount=200_000,
            effective_at=START + n * DAY_MS, expires_at=START + (n + 20) * DAY_MS if n % 3 == 0 else None,
            priority=n % 5, category="paid" if n % 2 else "promotional",
            price=9_900 if n % 2 else None, currency="USD" if n % 2 else None,
        )
        for n in range(BLOCKS)
    ]  # fmt: skip
    voids = [
        GrantVoided(
            event_id=f"ev-v{n}", tenant_id=TENANT, grant_id=f"g{n:02d}", voided_at=START + (n + 5) * DAY_MS
        )
        for n in range(4, BLOCKS, 10)
    ]
    step = (NOW - START - 60_000) // USAGE_EVENTS
    usage = [
        UsageRecorded(
            event_id=f"u{n}", tenant_id=TENANT, amount=40 + n % 50, occurred_at=START + 60_000 + n * step,
            model=MODELS[n % 4], prompt_tokens=100, completion_tokens=20,
        )
        for n in range(USAGE_EVENTS)
    ]  # fmt: skip
    return sorted(
        [*grants, *voids, *usage],
        key=lambda e: getattr(e, "occurred_at", None) or getattr(e, "voided_at", None) or e.effective_at,
    )


def fold(all_events: list) -> tuple[list, TenantLedger]:
    """The real fold, advanced to each event's time as the processor advances it (expiries, voids)."""
    ledger, entries = TenantLedger(TENANT), []
    for event in all_events:
        entries += ledger.apply(event)
        entries += ledger.advance_to(getattr(event, "occurred_at", None) or START)
    entries += ledger.advance_to(NOW)
    return entries, ledger


def load(url: str, entries: list) -> None:
    entry_movements = [movement_values(TENANT, movements(e)) for e in entries]
    entry_rows = (
        (e.entry_id, e.tenant_id, type(e).__struct_config__.tag, getattr(e, "occurred_at", None),
         getattr(e, "amount", None), encode_entry(e).decode(), "ledger.entries", 0, offset, NOW,
         *entry_finance_columns(rows).values())
        for offset, (e, rows) in enumerate(zip(entries, entry_movements, strict=True))
    )  # fmt: skip
    _copy(url, "ledger_entries", ENTRY_COLUMNS, entry_rows)
    _copy(
        url,
        "ledger_movements",
        MOVEMENT_COLUMNS,
        (tuple(r[c] for c in MOVEMENT_COLUMNS) for rows in entry_movements for r in rows),
    )
    grants = [e for e in entries if type(e) is GrantRecorded]
    terms = [
        (g.grant_id, TENANT, g.category, g.price, g.currency, g.reference, msgspec.json.encode(g).decode())
        for g in grants
    ]
    _copy(url, "grant_terms", GRANT_COLUMNS, terms)
    with psycopg.connect(libpq_url(url), autocommit=True) as connection:
        connection.execute(DAYS_SQL)
        connection.execute("VACUUM ANALYZE")


async def add_rows(sessions, all_events: list, ledger: TenantLedger) -> None:
    voided = {e.grant_id: e.voided_at for e in all_events if type(e) is GrantVoided}
    async with sessions() as session, session.begin():
        session.add(Tenant(tenant_id=TENANT, name="Bench Co", tier="pro", created_at_ms=START))
        await session.flush()
        for e in all_events:
            if type(e) is CreditGranted:
                session.add(Grant(
                    grant_id=e.grant_id, tenant_id=TENANT, event_id=e.event_id, amount=e.amount,
                    effective_at_ms=e.effective_at, expires_at_ms=e.expires_at, priority=e.priority,
                    idempotency_key=e.event_id, request_sha256=b"", created_at_ms=e.effective_at,
                    published_at_ms=e.effective_at, voided_at_ms=voided.get(e.grant_id),
                    void_event_id=f"ev-void-{e.grant_id}" if e.grant_id in voided else None,
                    category=e.category, price=e.price, currency=e.currency, reference="",
                ))  # fmt: skip
        session.add(Balance(tenant_id=TENANT, balance=ledger.balance_at(NOW), overage=ledger.overage_at(NOW),
                            as_of_ms=NOW, updated_at_ms=NOW))  # fmt: skip


def percentile(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def timed(client: httpx.AsyncClient, path: str) -> tuple[list[float], httpx.Response]:
    times, response = [], None
    for n in range(WARMUP + REQUESTS):
        started = time.perf_counter()
        response = await client.get(path)
        elapsed = (time.perf_counter() - started) * 1000
        assert response.status_code == 200, (path, response.status_code, response.text[:500])
        if n >= WARMUP:
            times.append(elapsed)
    return times, response


async def measure(url: str, all_events: list, ledger: TenantLedger) -> dict:
    engine = build_async_engine(url, DatabaseSettings())
    sessions = build_session_factory(engine)
    try:
        await add_rows(sessions, all_events, ledger)
        app = FastAPI()
        app.state.session_factory, app.state.event_log = sessions, None
        mount_console(app, AdminSettings(), TOKEN, [], ConsoleSettings(), clock_ms=lambda: NOW)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench.test") as client:
            csrf = CSRF.search((await client.get("/console/sign-in")).text)[1]
            signed_in = await client.post("/console/sign-in", data={"token": TOKEN, "csrf": csrf})
            assert signed_in.status_code == 303, signed_in.text
            page, page_response = await timed(client, f"/console/tenants/{TENANT}")
            chart, chart_response = await timed(
                client, f"/console/tenants/{TENANT}/burndown.json?width={CHART_WIDTH_PX}"
            )
            usage, _ = await timed(client, f"/console/tenants/{TENANT}/usage.json")
    finally:
        await engine.dispose()
    data = chart_response.json()
    assert f"{ledger.balance_at(NOW):,}" in page_response.text, "the page shows the ledger's balance"
    assert len(data["series"]) == BLOCKS and data["points"] <= CHART_WIDTH_PX
    assert data["remaining_total"] == sum(b.remaining for b in ledger.blocks_at(NOW)), (
        "the chart ends at the fold"
    )
    return {
        "page_ms_p50": round(statistics.median(page), 1),
        "page_ms_p99": round(percentile(page, 0.99), 1),
        "burndown_ms_p50": round(statistics.median(chart), 1),
        "burndown_ms_p99": round(percentile(chart, 0.99), 1),
        "usage_ms_p50": round(statistics.median(usage), 1),
        "chart_series": len(data["series"]),
        "chart_points_per_series": data["points"],
        "page_bytes": len(page_response.content),
    }


def main() -> None:
    all_events = events()
    entries, ledger = fold(all_events)
    with tempfile.TemporaryDirectory(prefix="bench-console-") as scratch:
        url = start_embedded_postgres(Path(scratch) / "pgdata", delete_on_exit=True)
        upgrade_database(url)
        load(url, entries)
        figures = asyncio.run(measure(url, all_events, ledger))
    print(
        json.dumps(
            {
                "bench": "console",
                "history_entries": len(entries),
                "blocks": BLOCKS,
                "requests": REQUESTS,
                **figures,
                "page_target_ms": PAGE_TARGET_MS,
                "page_met": figures["page_ms_p99"] <= PAGE_TARGET_MS,
                "load_1m": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )


if __name__ == "__main__":
    main()
