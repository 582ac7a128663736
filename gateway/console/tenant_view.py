"""The tenant page's data, shared by the console (operator and finance) and the portal (one tenant,
read-only): balance cards, grants, history, keys, and the chart and statement reads."""

from __future__ import annotations

import calendar
import csv
import io
import re
import time

import msgspec
from fastapi import HTTPException
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.admin import queries
from gateway.console import data
from gateway.console.runtime import ConsoleRuntime
from ledger.statement import StatementLine, statement_lines
from storage.finance import tenant_statement
from storage.tenants import Tenant

PERIOD = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
USAGE_DAYS = 30
WIDTH_PX_DEFAULT = 800


async def existing(session: AsyncSession, tenant_id: str) -> Tenant:
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise HTTPException(404, f"no tenant {tenant_id!r}")
    return tenant


async def balance_cards(
    session: AsyncSession, app, tenant_id: str, now_ms: int, grants: list | None = None
) -> dict:
    """The three balances (README "Three balances"): settled, the balance the stream processor last
    published (ledger.balances, projected); live, settled less the open holds of admitted requests as this
    gateway's admission counts them (gateway.admin.queries.open_holds; none where it admits nothing);
    pending, the grants recorded but not yet effective. And the remaining credit's money where priced."""
    settled = await data.settled_balance(session, tenant_id)
    grants = grants if grants is not None else await data.grants(session, tenant_id)
    held = await queries.open_holds(app, tenant_id)
    pending = [
        row.grant
        for row in grants
        if row.grant.effective_at_ms > now_ms
        and row.grant.voided_at_ms is None
        and (row.grant.expires_at_ms is None or row.grant.expires_at_ms > row.grant.effective_at_ms)
    ]
    money: dict[str, int] = {}
    for row in grants:
        if row.remaining_money is not None and row.grant.voided_at_ms is None:
            money[row.grant.currency or ""] = money.get(row.grant.currency or "", 0) + row.remaining_money
    return {
        "held": held,
        "live": None if settled is None or held is None else settled.balance - held,
        "pending_total": sum(grant.amount for grant in pending),
        "pending": sorted(pending, key=lambda grant: grant.effective_at_ms),
        "settled": None if settled is None else settled.balance,
        "overage": None if settled is None else settled.overage,
        "as_of": None if settled is None else settled.as_of_ms,
        "money": sorted(money.items()),
    }


async def page_context(
    session: AsyncSession, app, runtime: ConsoleRuntime, tenant_id: str, query: dict[str, str]
) -> dict:
    tenant = await existing(session, tenant_id)
    before = int(query["before"]) if query.get("before", "").isdigit() else None
    history = await data.history_page(
        session,
        tenant_id,
        before,
        runtime.settings.history_page_size,
        query.get("type", ""),
        query.get("model", ""),
    )
    grants = await data.grants(session, tenant_id)
    return {
        "tenant": tenant,
        "cards": await balance_cards(session, app, tenant_id, runtime.clock_ms(), grants),
        "grants": grants,
        "history": history,
        "filters": {"type": query.get("type", ""), "model": query.get("model", "")},
        "period": time.strftime("%Y-%m", time.gmtime(runtime.clock_ms() / 1000)),
        "now_ms": runtime.clock_ms(),
    }


async def burndown(session: AsyncSession, runtime: ConsoleRuntime, tenant_id: str, width: str) -> dict:
    await existing(session, tenant_id)
    width_px = int(width) if width.isdigit() else WIDTH_PX_DEFAULT
    settings = runtime.settings
    return await data.burndown_chart(
        session,
        tenant_id,
        runtime.clock_ms(),
        width_px,
        settings.chart_points_max,
        settings.burn_rate_window_s * 1000,
    )


async def usage(session: AsyncSession, runtime: ConsoleRuntime, tenant_id: str) -> dict:
    await existing(session, tenant_id)
    return await data.usage_by_day(session, tenant_id, USAGE_DAYS, runtime.clock_ms())


def period_bounds(period: str) -> tuple[int, int]:
    match = PERIOD.match(period)
    if match is None:
        raise HTTPException(422, "period: must be YYYY-MM")
    year, month = int(match[1]), int(match[2])
    start = calendar.timegm((year, month, 1, 0, 0, 0)) * 1000
    end = calendar.timegm((year + month // 12, month % 12 + 1, 1, 0, 0, 0)) * 1000
    return start, end


async def statement(session: AsyncSession, tenant_id: str, period: str):
    """The statement of a calendar month (UTC), as the admin API's statements route builds it."""
    await existing(session, tenant_id)
    start, end = period_bounds(period)
    return await tenant_statement(session, tenant_id, start, end)


def statement_csv(statement) -> bytes:
    """The long-form CSV `tollgate statements --format csv` writes (ledger.statement.statement_lines)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(StatementLine._fields)
    for line in statement_lines(statement):
        writer.writerow(["" if value is None else value for value in line])
    return out.getvalue().encode()


def statement_json(statement) -> dict:
    return msgspec.to_builtins(statement)
