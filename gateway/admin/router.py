"""The admin API: `build_admin_router(...)` returns an APIRouter for the gateway app to mount.

Every route needs `Authorization: Bearer <TOLLGATE_ADMIN_TOKEN>` (compared in constant time). The
database and the event bus come in through FastAPI dependencies, so the app can hand over what its
lifespan created (and tests a recording publisher):

    router = build_admin_router(
        settings=AdminSettings(),
        session_factory_dependency=lambda request: request.app.state.session_factory,
        publisher_dependency=lambda request: request.app.state.event_producer,
    )
    app.include_router(router)
"""

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.admin import commands, queries
from gateway.admin.errors import ERROR_RESPONSES, AdminError, AdminRoute, ErrorBody
from gateway.admin.models import (
    SEQUENCE_MAX,
    BalanceView,
    EntriesPage,
    GrantCreate,
    GrantView,
    IdempotencyKey,
    IdentifierText,
    KeyCreated,
    KeyRevoked,
    TenantCreate,
    TenantIdText,
    TenantView,
    TimeMs,
)
from gateway.admin.publisher import EventPublisher
from gateway.admin.settings import AdminSettings, resolve_admin_token
from ledger.events import Event
from storage.tenants import Grant, Tenant
from streams.records import encode_revocation

logger = logging.getLogger(__name__)

PREFIX = "/admin/v1"
PUBLISH_RETRY_AFTER_S = 1

# Checked here, at the boundary: a NUL byte or an out-of-range number never reaches Postgres.
TenantIdPath = Annotated[TenantIdText, Path()]
Identifier = Annotated[IdentifierText, Path()]


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


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
        created_at=grant.created_at_ms,
        voided_at=grant.voided_at_ms,
        void_event_id=grant.void_event_id,
    )


def build_admin_router(
    *,
    settings: AdminSettings,
    session_factory_dependency: Callable[..., async_sessionmaker[AsyncSession]],
    publisher_dependency: Callable[..., EventPublisher],
    admin_token: str | None = None,
    clock_ms: Callable[[], int] = wall_clock_ms,
) -> APIRouter:
    """The admin router. `admin_token` defaults to `resolve_admin_token(settings)` (generated and
    printed in development when TOLLGATE_ADMIN_TOKEN is unset)."""
    expected_token = (admin_token if admin_token is not None else resolve_admin_token(settings)).encode()
    bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken", description="TOLLGATE_ADMIN_TOKEN")

    async def require_admin(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            raise AdminError(401, "Authorization", "an admin bearer token is required", headers=challenge)
        if not hmac.compare_digest(credentials.credentials.encode(), expected_token):
            raise AdminError(401, "Authorization", "the admin token is wrong", headers=challenge)

    Sessions = Annotated[async_sessionmaker[AsyncSession], Depends(session_factory_dependency)]
    Publisher = Annotated[EventPublisher, Depends(publisher_dependency)]

    async def publish(publisher: EventPublisher, event: Event) -> None:
        await accepted(publisher.publish(event), event.event_id)

    async def accepted(sending: Awaitable[object], what: str) -> None:
        """Await a publish within publish_timeout_ms, or answer 503 (retry) saying why."""
        try:
            async with asyncio.timeout(settings.publish_timeout_ms / 1000):
                await sending
        except Exception as error:
            logger.warning("publishing %s failed: %r", what, error)
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                detail={
                    "field": None,
                    "message": f"the event bus did not accept the event ({error!r}); retry",
                },
                headers={"Retry-After": str(PUBLISH_RETRY_AFTER_S)},
            ) from error

    router = APIRouter(
        prefix=PREFIX,
        tags=["admin"],
        route_class=AdminRoute,
        dependencies=[Depends(require_admin)],
        responses=ERROR_RESPONSES,
    )

    @router.post("/tenants", status_code=status.HTTP_201_CREATED, response_model=TenantView)
    async def create_tenant(body: TenantCreate, sessions: Sessions) -> TenantView:
        async with sessions() as session, session.begin():
            tenant = await commands.create_tenant(session, body, settings.tenant_tiers, clock_ms())
        return tenant_view(tenant)

    @router.post("/tenants/{tenant_id}/keys", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
    async def create_key(tenant_id: TenantIdPath, sessions: Sessions, response: Response) -> KeyCreated:
        """A new API key. The full key is in this response only (stored hashed): keep it."""
        async with sessions() as session, session.begin():
            api_key, generated = await commands.issue_key(session, tenant_id, clock_ms())
        response.headers["Cache-Control"] = "no-store"
        return KeyCreated(
            key_id=api_key.key_id,
            key=generated.presented,
            prefix=api_key.prefix,
            tenant_id=api_key.tenant_id,
            created_at=api_key.created_at_ms,
        )

    @router.delete(
        "/keys/{key_id}",
        response_model=KeyRevoked,
        responses={503: {"model": ErrorBody, "description": "revoked, but not yet announced to the gateways; retry"}},
    )
    async def revoke_key(key_id: Identifier, sessions: Sessions, publisher: Publisher) -> KeyRevoked:
        """Revoke the key and announce it on `tenant.keys`: every gateway drops it from its cache at once.
        Revoking again announces the first revocation again."""
        async with sessions() as session, session.begin():
            api_key = await commands.revoke_key(session, key_id, clock_ms())
        assert api_key.revoked_at_ms is not None, "revoke_key returned an unrevoked key"
        revocation = commands.revoked_record(api_key)
        await accepted(
            publisher.append(publisher.topics.keys, api_key.key_id.encode(), encode_revocation(revocation)),
            f"revocation of {api_key.key_id}",
        )
        return KeyRevoked(
            key_id=api_key.key_id, tenant_id=api_key.tenant_id, revoked_at=api_key.revoked_at_ms
        )

    @router.post(
        "/tenants/{tenant_id}/grants",
        status_code=status.HTTP_201_CREATED,
        response_model=GrantView,
        responses={
            409: {"model": ErrorBody, "description": "Idempotency-Key reused with a different body"},
            503: {
                "model": ErrorBody,
                "description": "the event bus did not accept the event; retry with the same key",
            },
        },
    )
    async def create_grant(
        tenant_id: TenantIdPath,
        body: GrantCreate,
        idempotency_key: Annotated[IdempotencyKey, Header()],
        response: Response,
        sessions: Sessions,
        publisher: Publisher,
    ) -> GrantView:
        """Grant credit and emit CreditGranted. A repeat with the same Idempotency-Key and body returns
        the first grant (header `Idempotent-Replayed: true`) and grants nothing more."""
        async with sessions() as session, session.begin():
            grant, created = await commands.record_grant(
                session, tenant_id, idempotency_key, body, settings.grant_amount_max, clock_ms()
            )
        if grant.published_at_ms is None:
            async with sessions() as session, session.begin():
                unpublished = await commands.unpublished_grant(session, grant.grant_id)
                if unpublished is not None:  # else a concurrent retry published it while we waited
                    await publish(publisher, commands.granted_event(unpublished))
                    await commands.mark_grant_published(session, grant.grant_id, clock_ms())
        if not created:
            response.headers["Idempotent-Replayed"] = "true"
        return grant_view(grant)

    @router.post("/grants/{grant_id}/void", response_model=GrantView)
    async def void_grant(grant_id: Identifier, sessions: Sessions, publisher: Publisher) -> GrantView:
        """Void the grant from now on and emit GrantVoided; voiding again returns the first void."""
        async with sessions() as session, session.begin():
            grant = await commands.record_void(session, grant_id, clock_ms())
        if grant.void_published_at_ms is None:
            async with sessions() as session, session.begin():
                unpublished = await commands.unpublished_void(session, grant.grant_id)
                if unpublished is not None:  # else a concurrent retry published it while we waited
                    await publish(publisher, commands.voided_event(unpublished))
                    await commands.mark_void_published(session, grant.grant_id, clock_ms())
        return grant_view(grant)

    @router.get("/tenants/{tenant_id}/balance", response_model=BalanceView)
    async def get_balance(
        tenant_id: TenantIdPath,
        sessions: Sessions,
        at: Annotated[TimeMs | None, Query(description="epoch ms or ISO 8601; default now")] = None,
    ) -> BalanceView:
        at_ms = at if at is not None else clock_ms()
        async with sessions() as session, session.begin():
            await commands.existing_tenant(session, tenant_id)
            return await queries.balance_at(session, tenant_id, at_ms, settings.balance_events_max)

    @router.get("/tenants/{tenant_id}/entries", response_model=EntriesPage)
    async def get_entries(
        tenant_id: TenantIdPath,
        sessions: Sessions,
        since: Annotated[
            int, Query(ge=0, le=SEQUENCE_MAX, description="the `sequence` of the last entry already read")
        ] = 0,
        limit: Annotated[
            int | None, Query(ge=1, description="page size; default and maximum configured")
        ] = None,
    ) -> EntriesPage:
        page_size = limit if limit is not None else settings.entries_page_size_default
        if page_size > settings.entries_page_size_max:
            raise AdminError(422, "limit", f"must be at most {settings.entries_page_size_max}")
        async with sessions() as session, session.begin():
            await commands.existing_tenant(session, tenant_id)
            return await queries.entries_page(session, tenant_id, since, page_size)

    return router
