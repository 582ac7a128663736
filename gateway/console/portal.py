"""The tenant portal under /portal: one tenant's balances, grants, history, usage chart and statements,
read-only, opened by a signed link (gateway.console.portal_links).

`/portal/enter/{token}` checks the link (HMAC, expiry) and exchanges it for a portal session cookie
(signed: the tenant id and the link's expiry; HttpOnly, SameSite=Lax so that the redirect that follows a
link opened from another site carries it, path /portal); an expired or altered link is a 403 page that
says so. Every portal page reads the tenant from that cookie only: no page takes a tenant id, so a link
for one tenant never shows another's data.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from gateway.console import tenant_view
from gateway.console.auth import Runtime
from gateway.console.routes import _csv
from gateway.console.runtime import ConsoleRoute, PortalRefused
from gateway.console.signing import PORTAL, Refused

PORTAL_COOKIE = "tollgate_portal"
PORTAL_SESSION = "tenant-portal-session"
COOKIE_PATH = "/portal"

router = APIRouter(prefix="/portal", route_class=ConsoleRoute, include_in_schema=False)


def portal_tenant(request: Request, runtime: Runtime) -> str:
    token = request.cookies.get(PORTAL_COOKIE)
    if token is None:
        raise PortalRefused("missing")
    try:
        return str(runtime.signer.verify(PORTAL_SESSION, token, runtime.clock_ms())["t"])
    except Refused as refused:
        raise PortalRefused(refused.reason) from None


PortalTenant = Annotated[str, Depends(portal_tenant)]


@router.get("/enter/{token}")
async def enter(token: str, runtime: Runtime) -> Response:
    try:
        payload = runtime.signer.verify(PORTAL, token, runtime.clock_ms())
    except Refused as refused:
        raise PortalRefused(refused.reason) from None
    response = RedirectResponse("/portal", status_code=303)
    session = runtime.signer.sign(PORTAL_SESSION, {"t": payload["t"], "exp": payload["exp"]})
    response.set_cookie(
        PORTAL_COOKIE,
        session,
        max_age=max(1, (payload["exp"] - runtime.clock_ms()) // 1000),
        path=COOKIE_PATH,
        httponly=True,
        samesite="lax",
        secure=runtime.secure_cookies,
    )
    return response


@router.get("")
async def portal_page(request: Request, runtime: Runtime, tenant_id: PortalTenant) -> Response:
    async with request.app.state.session_factory() as session:
        context = await tenant_view.page_context(
            session, request.app, runtime, tenant_id, dict(request.query_params)
        )
    return runtime.render(
        "tenant.html", session=None, portal=True, base="/portal", keys=[], done=None, **context
    )


@router.get("/fragments/balance")
async def balance_fragment(request: Request, runtime: Runtime, tenant_id: PortalTenant) -> Response:
    async with request.app.state.session_factory() as session:
        cards = await tenant_view.balance_cards(session, request.app, tenant_id, runtime.clock_ms())
    return runtime.render("_balance_cards.html", cards=cards, base="/portal")


@router.get("/burndown.json")
async def burndown(request: Request, runtime: Runtime, tenant_id: PortalTenant, width: str = "") -> Response:
    async with request.app.state.session_factory() as session:
        return JSONResponse(await tenant_view.burndown(session, runtime, tenant_id, width))


@router.get("/usage.json")
async def usage(request: Request, runtime: Runtime, tenant_id: PortalTenant) -> Response:
    async with request.app.state.session_factory() as session:
        return JSONResponse(await tenant_view.usage(session, runtime, tenant_id))


@router.get("/statement")
async def statement(
    request: Request, runtime: Runtime, tenant_id: PortalTenant, period: str, format: str = "html"
) -> Response:
    async with request.app.state.session_factory() as session:
        found = await tenant_view.statement(session, tenant_id, period)
    if format == "csv":
        return _csv(found, f"statement-{period}.csv")
    return runtime.render(
        "statement.html",
        session=None,
        statement=found,
        lines=tenant_view.statement_lines(found),
        period=period,
        base="/portal",
    )
