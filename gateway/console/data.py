"""The console's reads, over the projections (storage models); one query per question, each bounded.

tenants(q)        search by id or name, with tier and settled balance
overview_day()    credits granted and consumed today (ledger_movement_days)
tenant_page()     grants with their remaining credit, keys, the settled balance
history_page()    entries newest first, paged by sequence, filtered by type and model, each with the
                  balance after it (the running sum of the entries' credits in recorded order)
burndown()        burndown.chart over the blocks' movements summed into the chart's points in SQL
usage_by_day()    consumption per UTC day and model (ledger_movement_days)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.console import burndown
from ledger.entries import Entry
from ledger.statement import CONSUMPTION
from storage.finance import DAY_MS, LedgerMovement, LedgerMovementDay
from storage.projections import Balance, LedgerEntry
from storage.tenants import ApiKey, Grant, Tenant

TENANTS_PAGE = 50
ENTRY_TYPES = tuple(sorted(kind.__struct_config__.tag for kind in get_args(Entry)))
GRANT_SECTION = "grant"


@dataclass(frozen=True, slots=True)
class TenantRow:
    tenant_id: str
    name: str
    tier: str
    balance: int | None
    overage: int | None


async def tenants(session: AsyncSession, query: str, limit: int = TENANTS_PAGE) -> list[TenantRow]:
    statement = (
        select(Tenant.tenant_id, Tenant.name, Tenant.tier, Balance.balance, Balance.overage)
        .outerjoin(Balance, Balance.tenant_id == Tenant.tenant_id)
        .order_by(Tenant.created_at_ms.desc(), Tenant.tenant_id)
        .limit(limit)
    )
    if query:
        pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        statement = statement.where(or_(Tenant.name.ilike(pattern), Tenant.tenant_id.ilike(pattern)))
    return [TenantRow(*row) for row in (await session.execute(statement)).all()]


async def tenant_count(session: AsyncSession) -> int:
    return (await session.execute(select(func.count()).select_from(Tenant))).scalar_one()


async def overview_day(session: AsyncSession, now_ms: int) -> tuple[int, int]:
    """(credits granted, credits consumed) booked today (UTC), every tenant together."""
    d = LedgerMovementDay
    rows = (
        await session.execute(
            select(d.section, func.sum(d.credits))
            .where(d.day == now_ms // DAY_MS, d.section.in_((GRANT_SECTION, CONSUMPTION)))
            .group_by(d.section)
        )
    ).all()
    sums = {section: int(total) for section, total in rows}
    return sums.get(GRANT_SECTION, 0), -sums.get(CONSUMPTION, 0)


@dataclass(frozen=True, slots=True)
class GrantRow:
    grant: Grant
    remaining: int  # credits left in the block (its movements' sum)

    @property
    def remaining_money(self) -> int | None:
        """The remaining credit's share of the price (minor units), for a priced grant."""
        g = self.grant
        return None if not g.price else g.price * max(self.remaining, 0) // g.amount


async def grants(session: AsyncSession, tenant_id: str) -> list[GrantRow]:
    d = LedgerMovementDay  # every movement, summed per day: a few rows per grant and day, not one per usage
    remaining = (
        select(d.grant_id, func.sum(d.credits).label("left"))
        .where(d.tenant_id == tenant_id, d.grant_id != "")
        .group_by(d.grant_id)
        .subquery()
    )
    rows = (
        await session.execute(
            select(Grant, remaining.c.left)
            .outerjoin(remaining, remaining.c.grant_id == Grant.grant_id)
            .where(Grant.tenant_id == tenant_id)
            .order_by(Grant.created_at_ms.desc(), Grant.grant_id)
        )
    ).all()
    return [GrantRow(grant, int(left or 0)) for grant, left in rows]


async def keys(session: AsyncSession, tenant_id: str) -> list[ApiKey]:
    query = select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at_ms.desc())
    return list((await session.execute(query)).scalars())


async def settled_balance(session: AsyncSession, tenant_id: str) -> Balance | None:
    return await session.get(Balance, tenant_id)


@dataclass(frozen=True, slots=True)
class HistoryRow:
    sequence: int
    entry_type: str
    occurred_at_ms: int | None
    credits: int  # signed: what the entry did to the prepaid balance
    model: str | None
    entry_id: str
    balance_after: int


@dataclass(frozen=True, slots=True)
class HistoryPage:
    rows: list[HistoryRow]
    next_before: int | None  # the cursor of the next (older) page
    types: list[str]
    models: list[str]


async def history_page(
    session: AsyncSession, tenant_id: str, before: int | None, size: int, entry_type: str, model: str
) -> HistoryPage:
    e = LedgerEntry
    mine = e.tenant_id == tenant_id
    wanted = [mine]
    if before is not None:
        wanted.append(e.sequence < before)
    if entry_type:
        wanted.append(e.entry_type == entry_type)
    if model:
        wanted.append(e.model == model)
    found = (
        await session.execute(
            select(
                e.sequence,
                e.entry_type,
                func.coalesce(e.occurred_at_ms, e.booked_at_ms),  # a grant's entry: when it was booked
                func.coalesce(e.credits, 0),
                e.model,
                e.entry_id,
            )
            .where(and_(*wanted))
            .order_by(e.sequence.desc())
            .limit(size + 1)
        )
    ).all()
    page = found[:size]
    rows = await _with_balance_after(session, tenant_id, page)
    models = await _distinct(session, LedgerMovementDay.model, LedgerMovementDay.tenant_id == tenant_id)
    return HistoryPage(
        rows, page[-1][0] if len(found) > size else None, list(ENTRY_TYPES), [m for m in models if m]
    )


async def _distinct(session: AsyncSession, column, where) -> list[str]:
    return list((await session.execute(select(column).where(where).distinct().order_by(column))).scalars())


async def _with_balance_after(session: AsyncSession, tenant_id: str, page: list) -> list[HistoryRow]:
    """The balance after each row: the sum of the credits of every entry up to it in sequence order. The
    total (from the daily sums) less the entries after the page's newest row, then the page's range walked
    down (only the range's rows are read)."""
    if not page:
        return []
    e = LedgerEntry
    top, bottom = page[0][0], page[-1][0]
    d = LedgerMovementDay  # the sum of every entry's credits: its daily sums (a few rows a day)
    total = (
        await session.execute(select(func.coalesce(func.sum(d.credits), 0)).where(d.tenant_id == tenant_id))
    ).scalar_one()
    after_top = (  # the entries recorded after the page's newest: none on the first page
        await session.execute(
            select(func.coalesce(func.sum(e.credits), 0)).where(e.tenant_id == tenant_id, e.sequence > top)
        )
    ).scalar_one()
    through_top = int(total) - int(after_top)
    in_range = (
        await session.execute(
            select(e.sequence, func.coalesce(e.credits, 0))
            .where(e.tenant_id == tenant_id, e.sequence > bottom, e.sequence <= top)
            .order_by(e.sequence.desc())
        )
    ).all()
    after, balance, walk = {}, int(through_top), iter(in_range)
    for sequence, credits in walk:  # balance after `sequence`, then step below it
        after[sequence] = balance
        balance -= int(credits)
    after[bottom] = balance
    return [HistoryRow(s, t, at, int(c), mdl, eid, after[s]) for s, t, at, c, mdl, eid in page]


async def burndown_chart(
    session: AsyncSession, tenant_id: str, now_ms: int, width_px: int, points_max: int, window_ms: int
) -> dict:
    blocks = [
        burndown.Block(g.grant_id, g.amount, g.effective_at_ms, g.expires_at_ms, g.voided_at_ms, g.category)
        for g in (
            await session.execute(
                select(Grant)
                .where(Grant.tenant_id == tenant_id)
                .order_by(Grant.effective_at_ms, Grant.grant_id)
            )
        ).scalars()
    ]
    axis = burndown.axis_for(blocks, now_ms, width_px, points_max)
    m = LedgerMovement
    # Axis.first_point_at_or_after in SQL, in integers: ceil((t - t0) / step), 0 for t <= t0 (bigint division
    # rounds toward zero, the floor here); movements after now are left out.
    point = func.greatest(0, (m.own_time_ms - axis.t0_ms + axis.step_ms - 1) // axis.step_ms)
    summed = (
        await session.execute(
            select(m.grant_id, point, func.sum(m.credits))
            .where(m.tenant_id == tenant_id, m.grant_id != "", m.own_time_ms <= now_ms)
            .group_by(m.grant_id, point)
        )
    ).all()
    deltas = {(grant_id, min(int(index), axis.points - 1)): int(total) for grant_id, index, total in summed}
    series = burndown.block_series(axis, blocks, deltas)
    consumed = await consumed_since(session, tenant_id, now_ms - window_ms, now_ms)
    remaining = sum(values[-1] for values in series.values())
    return burndown.chart(axis, blocks, series, burndown.project(remaining, consumed, window_ms, now_ms))


async def consumed_since(session: AsyncSession, tenant_id: str, since_ms: int, now_ms: int) -> int:
    m = LedgerMovement
    total = (
        await session.execute(
            select(func.coalesce(func.sum(m.credits), 0)).where(
                m.tenant_id == tenant_id,
                m.section == CONSUMPTION,
                m.own_time_ms > since_ms,
                m.own_time_ms <= now_ms,
            )
        )
    ).scalar_one()
    return max(0, -int(total))


async def usage_by_day(session: AsyncSession, tenant_id: str, days: int, now_ms: int) -> dict:
    """Credits consumed per UTC day and model over the last `days` days, for the usage chart."""
    d = LedgerMovementDay
    today = now_ms // DAY_MS
    rows = (
        await session.execute(
            select(d.day, d.model, -func.sum(d.credits))
            .where(d.tenant_id == tenant_id, d.section == CONSUMPTION, d.day > today - days, d.model != "")
            .group_by(d.day, d.model)
        )
    ).all()
    day_list = list(range(today - days + 1, today + 1))
    models = sorted({model for _, model, _ in rows})
    values = {(int(day), model): int(total) for day, model, total in rows}
    return {
        "x": [day * DAY_MS // 1000 for day in day_list],
        "series": [
            {"model": model, "values": [values.get((day, model), 0) for day in day_list]} for model in models
        ],
    }


async def grant(session: AsyncSession, grant_id: str) -> GrantRow | None:
    found = await session.get(Grant, grant_id)
    if found is None:
        return None
    m = LedgerMovement
    left = (
        await session.execute(select(func.coalesce(func.sum(m.credits), 0)).where(m.grant_id == grant_id))
    ).scalar_one()
    return GrantRow(found, int(left))
