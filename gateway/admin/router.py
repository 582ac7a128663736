"""The admin API: `router`, one module-level APIRouter; `build_admin_router(...)` mounts it for an app.

Every route needs `Authorization: Bearer <TOLLGATE_ADMIN_TOKEN>` (compared in constant time). The
routes are thin (validate -> call -> map): FastAPI validates the request (`gateway.admin.models`), a
command (`gateway.admin.commands`: record -> publish -> mark published) or a query
(`gateway.admin.queries`) does the work, and the result is mapped to its response model here. What a
route needs comes through the typed aliases of `gateway.admin.deps`. The database and the event bus are
the app's, handed over as FastAPI dependencies, so the app passes what its lifespan created (and tests a
recording publisher):

    app.include_router(
        build_admin_router(
            settings=AdminSettings(),
            session_factory_dependency=lambda request: request.app.state.session_factory,
            publisher_dependency=lambda request: request.app.state.event_producer,
        )
    )
"""

# No `from __future__ import annotations`: `bind_runtime` annotates with dependencies local to
# build_admin_router, which FastAPI can resolve only from live annotations.
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response, status
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.admin import audit, audit_log, commands, credentials, finance, model_routes, policies, queries
from gateway.admin.audit_log import CapturingPublisher, record_action
from gateway.admin.deps import (
    RUNTIME_STATE,
    AdminRuntime,
    Clock,
    Identifier,
    Publisher,
    Sessions,
    Settings,
    TenantIdPath,
    require_admin,
    wall_clock_ms,
)
from gateway.admin.errors import AUDIT_HOOK_STATE, ERROR_RESPONSES, AdminError, AdminRoute, ErrorBody
from gateway.admin.models import (
    SEQUENCE_MAX,
    BalanceView,
    EntriesPage,
    GrantCreate,
    GrantView,
    IdempotencyKey,
    KeyBudgetFields,
    KeyBudgetView,
    KeyCreated,
    KeyRevoked,
    TenantCreate,
    TenantView,
    TimeMs,
)
from gateway.admin.publisher import EventPublisher
from gateway.admin.rules import router as rule_routes
from gateway.admin.settings import AdminSettings, resolve_admin_token
from gateway.admin.webhooks import router as webhook_routes
from gateway.console import portal_links
from storage.tenants import Grant, Tenant

PREFIX = "/admin/v1"
NOT_ANNOUNCED = {"model": ErrorBody, "description": "revoked, but not yet announced to the gateways; retry"}
NOT_PUBLISHED = {
    "model": ErrorBody,
    "description": "the event bus did not accept the event; retry with the same key",
}
KEY_REUSED = {"model": ErrorBody, "description": "Idempotency-Key reused with a different body"}

router = APIRouter(
    prefix=PREFIX,
    tags=["admin"],
    route_class=AdminRoute,
    dependencies=[Depends(require_admin)],
    responses=ERROR_RESPONSES,
)


def tenant_view(tenant: Tenant) -> TenantView:
    return TenantView(
        tenant_id=tenant.tenant_id, name=tenant.name, tier=tenant.tier, created_at=tenant.created_at_ms
    )


def grant_view(grant: Grant) -> GrantView:
    return GrantView(
        grant_id=grant.grant_id,
        tenant_id=grant.tenant_id,
        event_id=grant.event_id,
        amount=grant.amount,
        effective_at=grant.effective_at_ms,
        expires_at=grant.expires_at_ms,
        priority=grant.priority,
        category=grant.category,
        price=grant.price,
        currency=grant.currency,
        reference=grant.reference,
        created_at=grant.created_at_ms,
        voided_at=grant.voided_at_ms,
        void_event_id=grant.void_event_id,
        models=list(grant.models),
    )


@router.post("/tenants", status_code=status.HTTP_201_CREATED, response_model=TenantView)
async def create_tenant(
    body: TenantCreate, sessions: Sessions, settings: Settings, clock: Clock
) -> TenantView:
    async with sessions() as session, session.begin():
        tenant = await commands.create_tenant(session, body, settings.tenant_tiers, clock())
    return tenant_view(tenant)


@router.post("/tenants/{tenant_id}/keys", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
async def create_key(
    tenant_id: TenantIdPath,
    sessions: Sessions,
    clock: Clock,
    response: Response,
    body: Annotated[KeyBudgetFields, Body()] = KeyBudgetFields(),  # noqa: B008 (immutable, never mutated)
) -> KeyCreated:
    """A new API key, with optional spend limits (`daily_credits`, `monthly_credits`: credits per UTC
    day and calendar month). The full key is in this response only (stored hashed): keep it."""
    async with sessions() as session, session.begin():
        api_key, generated = await commands.issue_key(
            session, tenant_id, clock(), body.daily_credits, body.monthly_credits
        )
    response.headers["Cache-Control"] = "no-store"
    return KeyCreated(
        key_id=api_key.key_id,
        key=generated.presented,
        prefix=api_key.prefix,
        tenant_id=api_key.tenant_id,
        created_at=api_key.created_at_ms,
        daily_credits=api_key.daily_credits,
        monthly_credits=api_key.monthly_credits,
    )


@router.put("/keys/{key_id}/budget", response_model=KeyBudgetView)
async def set_key_budget(key_id: Identifier, body: KeyBudgetFields, sessions: Sessions) -> KeyBudgetView:
    """Replace the key's spend limits (a null or absent field: no limit in that window). Gateways apply
    it within their key cache's ttl (TOLLGATE_AUTH_CACHE_TTL_MS); strict admission at once."""
    async with sessions() as session, session.begin():
        api_key = await commands.set_key_budget(session, key_id, body.daily_credits, body.monthly_credits)
    return KeyBudgetView(
        key_id=api_key.key_id,
        tenant_id=api_key.tenant_id,
        daily_credits=api_key.daily_credits,
        monthly_credits=api_key.monthly_credits,
    )


@router.delete("/keys/{key_id}", response_model=KeyRevoked, responses={503: NOT_ANNOUNCED})
async def revoke_key(
    key_id: Identifier, sessions: Sessions, publisher: Publisher, settings: Settings, clock: Clock
) -> KeyRevoked:
    """Revoke the key and announce it on `tenant.keys`: every gateway drops it from its cache at once.
    Revoking again announces the first revocation again."""
    api_key = await commands.revoke_and_announce(sessions, publisher, settings, clock, key_id)
    assert api_key.revoked_at_ms is not None, f"revoke_and_announce returned the unrevoked key {key_id}"
    return KeyRevoked(key_id=api_key.key_id, tenant_id=api_key.tenant_id, revoked_at=api_key.revoked_at_ms)


@router.post(
    "/tenants/{tenant_id}/grants",
    status_code=status.HTTP_201_CREATED,
    response_model=GrantView,
    responses={409: KEY_REUSED, 503: NOT_PUBLISHED},
)
async def create_grant(
    tenant_id: TenantIdPath,
    body: GrantCreate,
    idempotency_key: Annotated[IdempotencyKey, Header()],
    response: Response,
    sessions: Sessions,
    publisher: Publisher,
    settings: Settings,
    clock: Clock,
) -> GrantView:
    """Grant credit and emit CreditGranted. A repeat with the same Idempotency-Key and body returns
    the first grant (header `Idempotent-Replayed: true`) and grants nothing more."""
    grant, created = await commands.grant_credit(
        sessions, publisher, settings, clock, tenant_id, idempotency_key, body
    )
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return grant_view(grant)


@router.post("/grants/{grant_id}/void", response_model=GrantView)
async def void_grant(
    grant_id: Identifier, sessions: Sessions, publisher: Publisher, settings: Settings, clock: Clock
) -> GrantView:
    """Void the grant from now on and emit GrantVoided; voiding again returns the first void."""
    return grant_view(await commands.void_grant(sessions, publisher, settings, clock, grant_id))


@router.get("/tenants/{tenant_id}/balance", response_model=BalanceView)
async def get_balance(
    request: Request,
    tenant_id: TenantIdPath,
    sessions: Sessions,
    settings: Settings,
    clock: Clock,
    at: Annotated[TimeMs | None, Query(description="epoch ms or ISO 8601; default now")] = None,
    as_known_at: Annotated[
        TimeMs | None, Query(description="the ledger as it stood then (knowledge time); default now")
    ] = None,
) -> BalanceView:
    """The three balances: settled (the fold at T), live (settled minus open holds, for now only, where
    this process admits requests) and pending (grants not yet effective at T)."""
    at_ms = at if at is not None else clock()
    async with sessions() as session, session.begin():
        await commands.existing_tenant(session, tenant_id)
        view = await queries.balance_at(session, tenant_id, at_ms, settings.balance_events_max, as_known_at)
    if at is None and as_known_at is None:
        held = await queries.open_holds(request.app, tenant_id)
        if held is not None:
            view = view.model_copy(update={"held": held, "live": view.settled - held})
    return view


@router.get("/tenants/{tenant_id}/entries", response_model=EntriesPage)
async def get_entries(
    tenant_id: TenantIdPath,
    sessions: Sessions,
    settings: Settings,
    since: Annotated[
        int, Query(ge=0, le=SEQUENCE_MAX, description="the `sequence` of the last entry already read")
    ] = 0,
    limit: Annotated[int | None, Query(ge=1, description="page size; default and maximum configured")] = None,
    as_known_at: Annotated[
        TimeMs | None, Query(description="only entries published by then (knowledge time); default: all")
    ] = None,
) -> EntriesPage:
    page_size = limit if limit is not None else settings.entries_page_size_default
    if page_size > settings.entries_page_size_max:
        raise AdminError(422, "limit", f"must be at most {settings.entries_page_size_max}")
    async with sessions() as session, session.begin():
        await commands.existing_tenant(session, tenant_id)
        return await queries.entries_page(session, tenant_id, since, page_size, as_known_at)


def build_admin_router(
    *,
    settings: AdminSettings,
    session_factory_dependency: Callable[..., async_sessionmaker[AsyncSession]],
    publisher_dependency: Callable[..., EventPublisher],
    admin_token: str | None = None,
    clock_ms: Callable[[], int] = wall_clock_ms,
) -> APIRouter:
    """`router`, mounted for one app: each request first gets its `AdminRuntime` bound (before the token
    check and the routes' own dependencies, which read it). `admin_token` defaults to
    `resolve_admin_token(settings)` (generated and printed in development when TOLLGATE_ADMIN_TOKEN is
    unset)."""
    token = (admin_token if admin_token is not None else resolve_admin_token(settings)).encode()

    def bind_runtime(
        request: Request,
        sessions: Annotated[async_sessionmaker[AsyncSession], Depends(session_factory_dependency)],
        publisher: Annotated[EventPublisher, Depends(publisher_dependency)],
    ) -> None:
        capturing = CapturingPublisher(publisher)  # the event ids the request publishes, for the audit log
        setattr(request.state, RUNTIME_STATE, AdminRuntime(settings, token, clock_ms, sessions, capturing))
        setattr(
            request.state, AUDIT_HOOK_STATE, lambda req, resp: record_action(req, resp, capturing.event_ids)
        )

    mounted = APIRouter(dependencies=[Depends(bind_runtime)])
    mounted.include_router(router)
    mounted.include_router(finance.router)  # statements, overage rate, period close (issue 14)
    mounted.include_router(policies.router)  # tenants' retention and safety policies (issue 19)
    mounted.include_router(model_routes.router)  # model aliases: canary, promotion, rollback (issue 19)
    mounted.include_router(audit.router)  # the checkpoint signing key, inclusion proofs (issue 15)
    mounted.include_router(audit_log.router)  # who did what (issue 15)
    mounted.include_router(credentials.router)  # named admin credentials, operator and finance (issue 15)
    mounted.include_router(portal_links.router)  # signed tenant portal links (issue 17)
    mounted.include_router(webhook_routes)  # tenants' webhook endpoints and delivery logs (issue 16)
    mounted.include_router(rule_routes)  # tenants' alert and auto top-up rules (issue 16)
    return mounted
