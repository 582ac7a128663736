"""Tenant portal links: `POST /admin/v1/tenants/{id}/portal-links` (operator) signs a link that opens a
read-only portal for that tenant alone, valid `TOLLGATE_CONSOLE_PORTAL_LINK_TTL_S` (default one hour).

The link's token is HMAC-SHA256 over the tenant id and the expiry (gateway.console.signing, purpose
`tenant-portal`, constant-time compare). `/portal/enter/{token}` exchanges it for a portal session cookie
(same tenant, same expiry) and redirects to `/portal`, so the token does not stay in the address bar.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request, status
from pydantic import BaseModel

from gateway.admin.commands import existing_tenant
from gateway.admin.deps import Runtime, Sessions, TenantIdPath, require_admin
from gateway.admin.errors import ERROR_RESPONSES, AdminRoute
from gateway.console.settings import ConsoleSettings
from gateway.console.signing import PORTAL, Signer, signer_for

ENTER_PATH = "/portal/enter/"

router = APIRouter(
    prefix="/admin/v1",
    tags=["admin"],
    route_class=AdminRoute,
    dependencies=[Depends(require_admin)],
    responses=ERROR_RESPONSES,
)


@dataclass(frozen=True, slots=True)
class PortalLink:
    path: str
    expires_at_ms: int


def issue(signer: Signer, tenant_id: str, now_ms: int, ttl_s: int) -> PortalLink:
    expires_at_ms = now_ms + ttl_s * 1000
    token = signer.sign(PORTAL, {"t": tenant_id, "exp": expires_at_ms})
    return PortalLink(ENTER_PATH + token, expires_at_ms)


class PortalLinkView(BaseModel):
    tenant_id: str
    url: str
    expires_at: int


@router.post(
    "/tenants/{tenant_id}/portal-links", status_code=status.HTTP_201_CREATED, response_model=PortalLinkView
)
async def create_portal_link(
    tenant_id: TenantIdPath, request: Request, sessions: Sessions, runtime: Runtime
) -> PortalLinkView:
    """A signed link to the tenant's read-only portal (balances, grants, history, usage, statements),
    valid for TOLLGATE_CONSOLE_PORTAL_LINK_TTL_S. Anyone holding it sees that tenant until it expires."""
    async with sessions() as session, session.begin():
        await existing_tenant(session, tenant_id)
    console = getattr(request.app.state, "console", None)
    settings = console.settings if console is not None else ConsoleSettings()
    signer = console.signer if console is not None else signer_for(_secret(settings), runtime.token.decode())
    link = issue(signer, tenant_id, runtime.clock_ms(), settings.portal_link_ttl_s)
    return PortalLinkView(
        tenant_id=tenant_id, url=str(request.base_url).rstrip("/") + link.path, expires_at=link.expires_at_ms
    )


def _secret(settings: ConsoleSettings) -> str | None:
    return None if settings.signing_secret is None else settings.signing_secret.get_secret_value()
