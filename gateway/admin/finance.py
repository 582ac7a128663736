"""Finance routes of the admin API: a tenant's statement, its overage rate, and closing a period.

    GET  /admin/v1/tenants/{id}/statements?from=&to=[&as_known_at=]   the statement of [from, to)
    PUT  /admin/v1/tenants/{id}/overage-rate            money per million credits of overage, or null
    POST /admin/v1/periods/close                        PeriodClosed for every tenant on ledger.events

A statement is read from the projection (storage.finance) and encoded by ledger.statement, so the same
books give the same bytes. Closing publishes one PeriodClosed per tenant (the fold is per tenant); its
event id is derived from tenant and time, so a retried close is a duplicate everywhere.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from sqlalchemy import select, update

from gateway.admin.commands import accepted, existing_tenant
from gateway.admin.deps import Publisher, Sessions, Settings, TenantIdPath, require_admin
from gateway.admin.errors import ERROR_RESPONSES, AdminError, AdminRoute
from gateway.admin.models import TimeMs
from ledger.events import PRICE_MAX, PeriodClosed
from ledger.statement import encode_statement
from storage.finance import tenant_statement
from storage.tenants import Tenant

router = APIRouter(
    prefix="/admin/v1",
    tags=["admin"],
    route_class=AdminRoute,
    dependencies=[Depends(require_admin)],
    responses=ERROR_RESPONSES,
)


class OverageRateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rate_per_million_credits: StrictInt | None = Field(
        ge=0, le=PRICE_MAX, description="minor units of `currency` per million credits; null: not priced"
    )
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$", description="ISO 4217")


class PeriodClose(BaseModel):
    model_config = ConfigDict(extra="forbid")

    until: TimeMs = Field(description="close everything before this time (epoch ms or ISO 8601)")


class PeriodClosedView(BaseModel):
    until: int
    tenants: list[str]


@router.get("/tenants/{tenant_id}/statements")
async def get_statement(
    tenant_id: TenantIdPath,
    sessions: Sessions,
    start: Annotated[TimeMs, Query(alias="from", description="period start, inclusive")],
    end: Annotated[TimeMs, Query(alias="to", description="period end, exclusive")],
    as_known_at: Annotated[
        TimeMs | None,
        Query(description="the books as they stood then: only entries published by then; default now"),
    ] = None,
) -> Response:
    """The tenant's statement of [from, to): balances, grants, consumption by model, expiries, voids,
    overage and adjustments to closed periods, in credits and money; it ties out. With `as_known_at`,
    as the books stood at that knowledge time (README "Audit")."""
    if end < start:
        raise AdminError(422, "to", "must not be before from")
    async with sessions() as session, session.begin():
        await existing_tenant(session, tenant_id)
        statement = await tenant_statement(session, tenant_id, start, end, as_known_at)
    return Response(encode_statement(statement), media_type="application/json")


@router.put("/tenants/{tenant_id}/overage-rate", response_model=OverageRateBody)
async def set_overage_rate(
    tenant_id: TenantIdPath, body: OverageRateBody, sessions: Sessions
) -> OverageRateBody:
    if body.rate_per_million_credits is not None and body.currency is None:
        raise AdminError(422, "currency", "a rate needs its currency")
    async with sessions() as session, session.begin():
        await existing_tenant(session, tenant_id, lock=True)
        await session.execute(
            update(Tenant)
            .where(Tenant.tenant_id == tenant_id)
            .values(
                overage_rate_per_million_credits=body.rate_per_million_credits,
                overage_currency=body.currency if body.rate_per_million_credits is not None else None,
            )
        )
    return body


@router.post("/periods/close", response_model=PeriodClosedView)
async def close_period(
    body: PeriodClose, sessions: Sessions, publisher: Publisher, settings: Settings
) -> PeriodClosedView:
    """Publish PeriodClosed(until) for every tenant; closing again (or earlier) changes nothing."""
    async with sessions() as session, session.begin():
        tenants = list((await session.execute(select(Tenant.tenant_id).order_by(Tenant.tenant_id))).scalars())
    for tenant_id in tenants:
        event = period_closed(tenant_id, body.until)
        await accepted(publisher.publish(event), event.event_id, settings.publish_timeout_ms)
    return PeriodClosedView(until=body.until, tenants=tenants)


def period_closed(tenant_id: str, until: int) -> PeriodClosed:
    return PeriodClosed(event_id=f"period-close/{tenant_id}/{until}", tenant_id=tenant_id, closed_until=until)
