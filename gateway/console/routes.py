"""The operator console's pages under /console (see gateway.console.auth for sign-in and CSRF).

Every page is rendered on the server; the numbers that move (the overview's, a tenant's balance cards)
are fragments htmx fetches again every few seconds; the charts' JSON is computed and downsampled here.
Finance credentials see everything and change nothing (no forms; a post is refused)."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from gateway.admin.deps import Identifier, TenantIdPath
from gateway.admin.principals import authenticate
from gateway.console import auth, data, overview, portal_links, tenant_view
from gateway.console import rules as console_rules
from gateway.console.actions import ActionRefused, Actions
from gateway.console.auth import Runtime, SignedIn
from gateway.console.runtime import ConsoleRoute

router = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)

DONE = {
    "tenant": "Tenant created.",
    "granted": "Credit granted.",
    "voided": "Grant voided.",
    "revoked": "Key revoked.",
    "rule": "Rule set: it shows here once the projector has archived its event (normally within a second).",
    "rule-removed": "Rule removed (the list follows once its event is archived).",
}


def _see(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _refused(runtime, signed_in, refusal: ActionRefused, back: str) -> Response:
    return runtime.render(
        "message.html",
        refusal.status_code,
        session=signed_in,
        title="Not done",
        message=refusal.message,
        back=back,
    )


@router.get("/sign-in")
async def sign_in_page(request: Request, runtime: Runtime) -> Response:
    token = request.cookies.get(auth.PRE_SIGN_IN_COOKIE) or secrets.token_urlsafe(24)
    response = runtime.render("sign_in.html", session=None, error=None, pre=token)
    auth.set_pre_sign_in(runtime, response, token)
    return response


@router.post("/sign-in")
async def sign_in(request: Request, runtime: Runtime) -> Response:
    form = await auth.form_of(request)
    pre = request.cookies.get(auth.PRE_SIGN_IN_COOKIE, "")
    if not pre or not secrets.compare_digest(form.get("csrf", "").encode(), pre.encode()):
        raise HTTPException(403, "the sign-in form's CSRF token is missing or stale: reload the page")
    principal = await authenticate(
        form.get("token", ""), runtime.admin_token.encode(), request.app.state.session_factory
    )
    if principal is None:
        return runtime.render(
            "sign_in.html", 401, session=None, error="That token is not a valid admin credential.", pre=pre
        )
    response = _see("/console")
    auth.start_session(runtime, response, principal)
    return response


@router.post("/sign-out")
async def sign_out(request: Request, signed_in: SignedIn) -> Response:
    await auth.checked_form(request, signed_in, change=False)
    response = _see("/console/sign-in")
    auth.end_session(response)
    return response


async def _overview_numbers(request: Request, runtime) -> dict:
    registry = getattr(getattr(request.app.state, "runtime", None), "metrics", None)
    metrics = overview.snapshot(None if registry is None else registry.registry)
    async with request.app.state.session_factory() as session:
        tenants = await data.tenant_count(session)
        granted, consumed = await data.overview_day(session, runtime.clock_ms())
    return {
        "tenants": tenants,
        "granted_today": granted,
        "consumed_today": consumed,
        "rps": runtime.rate.rate(runtime.clock_ms() / 1000, metrics.requests_total),
        "metrics": metrics,
        "workers": await overview.workers(runtime.worker_urls, runtime.settings.worker_health_timeout_ms),
    }


@router.get("")
async def overview_page(request: Request, runtime: Runtime, signed_in: SignedIn) -> Response:
    numbers = await _overview_numbers(request, runtime)
    return runtime.render("overview.html", session=signed_in, n=numbers)


@router.get("/fragments/overview")
async def overview_fragment(request: Request, runtime: Runtime, signed_in: SignedIn) -> Response:
    return runtime.render("_overview_numbers.html", n=await _overview_numbers(request, runtime))


@router.get("/tenants")
async def tenants_page(request: Request, runtime: Runtime, signed_in: SignedIn, q: str = "") -> Response:
    async with request.app.state.session_factory() as session:
        rows = await data.tenants(session, q.strip()[:200])
    return runtime.render(
        "tenants.html", session=signed_in, rows=rows, q=q, tiers=runtime.admin_settings.tenant_tiers
    )


@router.post("/tenants")
async def create_tenant(request: Request, runtime: Runtime, signed_in: SignedIn) -> Response:
    form = await auth.checked_form(request, signed_in)
    try:
        tenant_id = await Actions(request, runtime, signed_in).create_tenant(
            form.get("name", ""), form.get("tier", "")
        )
    except ActionRefused as refusal:
        return _refused(runtime, signed_in, refusal, "/console/tenants")
    return _see(f"/console/tenants/{tenant_id}?done=tenant")


@router.get("/tenants/{tenant_id}")
async def tenant_page(
    request: Request, runtime: Runtime, signed_in: SignedIn, tenant_id: TenantIdPath
) -> Response:
    query = dict(request.query_params)
    async with request.app.state.session_factory() as session:
        context = await tenant_view.page_context(session, request.app, runtime, tenant_id, query)
        keys = await data.keys(session, tenant_id)
        endpoints = await console_rules.tenant_webhooks(session, tenant_id)
    rules = await console_rules.tenant_rules(request.app.state.session_factory, tenant_id)
    return runtime.render(
        "tenant.html",
        session=signed_in,
        portal=False,
        base=f"/console/tenants/{tenant_id}",
        keys=keys,
        rules=rules,
        alert_kinds=console_rules.ALERT_KINDS,
        endpoints=endpoints,
        done=DONE.get(query.get("done", "")),
        idempotency_key=f"console-{secrets.token_hex(12)}",
        **context,
    )


@router.get("/tenants/{tenant_id}/fragments/balance")
async def balance_fragment(
    request: Request, runtime: Runtime, signed_in: SignedIn, tenant_id: TenantIdPath
) -> Response:
    async with request.app.state.session_factory() as session:
        await tenant_view.existing(session, tenant_id)
        cards = await tenant_view.balance_cards(session, request.app, tenant_id, runtime.clock_ms())
    return runtime.render("_balance_cards.html", cards=cards, base=f"/console/tenants/{tenant_id}")


@router.get("/tenants/{tenant_id}/burndown.json")
async def burndown(
    request: Request, runtime: Runtime, signed_in: SignedIn, tenant_id: TenantIdPath, width: str = ""
) -> Response:
    async with request.app.state.session_factory() as session:
        return JSONResponse(await tenant_view.burndown(session, runtime, tenant_id, width))


@router.get("/tenants/{tenant_id}/usage.json")
async def usage(request: Request, runtime: Runtime, signed_in: SignedIn, tenant_id: TenantIdPath) -> Response:
    async with request.app.state.session_factory() as session:
        return JSONResponse(await tenant_view.usage(session, runtime, tenant_id))


@router.get("/tenants/{tenant_id}/statement")
async def statement(
    request: Request,
    runtime: Runtime,
    signed_in: SignedIn,
    tenant_id: TenantIdPath,
    period: str,
    format: str = "html",
) -> Response:
    async with request.app.state.session_factory() as session:
        found = await tenant_view.statement(session, tenant_id, period)
    if format == "csv":
        return _csv(found, f"statement-{tenant_id}-{period}.csv")
    return runtime.render(
        "statement.html",
        session=signed_in,
        statement=found,
        lines=tenant_view.statement_lines(found),
        period=period,
        base=f"/console/tenants/{tenant_id}",
    )


def _csv(found, filename: str) -> Response:
    return Response(
        tenant_view.statement_csv(found),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.post("/tenants/{tenant_id}/grants")
async def grant(request: Request, runtime: Runtime, signed_in: SignedIn, tenant_id: TenantIdPath) -> Response:
    form = await auth.checked_form(request, signed_in)
    fields = {
        name: form[name]
        for name in ("amount", "effective_at", "expires_at", "category", "price", "currency", "reference")
        if form.get(name)
    }
    if form.get("models", "").strip():  # credit scoped to these models (issue 16); empty: any model
        fields["models"] = [name.strip() for name in form["models"].split(",") if name.strip()]
    for number in ("amount", "price"):
        if fields.get(number, "").lstrip("-").isdigit():
            fields[number] = int(fields[number])
    try:
        await Actions(request, runtime, signed_in).grant(tenant_id, form.get("idempotency_key", ""), fields)
    except ActionRefused as refusal:
        return _refused(runtime, signed_in, refusal, f"/console/tenants/{tenant_id}")
    return _see(f"/console/tenants/{tenant_id}?done=granted")


@router.get("/grants/{grant_id}/void")
async def void_confirmation(
    request: Request, runtime: Runtime, signed_in: SignedIn, grant_id: Identifier
) -> Response:
    if not signed_in.may_change:
        raise HTTPException(
            403, f"{signed_in.principal.name} has the {signed_in.principal.role} role: read-only"
        )
    async with request.app.state.session_factory() as session:
        found = await data.grant(session, grant_id)
    if found is None:
        raise HTTPException(404, f"no grant {grant_id!r}")
    return runtime.render("void_confirm.html", session=signed_in, row=found)


@router.post("/grants/{grant_id}/void")
async def void(request: Request, runtime: Runtime, signed_in: SignedIn, grant_id: Identifier) -> Response:
    await auth.checked_form(request, signed_in)
    try:
        tenant_id = await Actions(request, runtime, signed_in).void(grant_id)
    except ActionRefused as refusal:
        return _refused(runtime, signed_in, refusal, "/console/tenants")
    return _see(f"/console/tenants/{tenant_id}?done=voided")


@router.post("/tenants/{tenant_id}/keys")
async def create_key(
    request: Request, runtime: Runtime, signed_in: SignedIn, tenant_id: TenantIdPath
) -> Response:
    await auth.checked_form(request, signed_in)
    try:
        key_id, secret = await Actions(request, runtime, signed_in).create_key(tenant_id)
    except ActionRefused as refusal:
        return _refused(runtime, signed_in, refusal, f"/console/tenants/{tenant_id}")
    return runtime.render(
        "key_created.html",
        session=signed_in,
        key_id=key_id,
        secret=secret,
        back=f"/console/tenants/{tenant_id}",
    )


@router.post("/keys/{key_id}/revoke")
async def revoke_key(request: Request, runtime: Runtime, signed_in: SignedIn, key_id: Identifier) -> Response:
    await auth.checked_form(request, signed_in)
    try:
        tenant_id = await Actions(request, runtime, signed_in).revoke_key(key_id)
    except ActionRefused as refusal:
        return _refused(runtime, signed_in, refusal, "/console/tenants")
    return _see(f"/console/tenants/{tenant_id}?done=revoked")


@router.post("/tenants/{tenant_id}/portal-link")
async def portal_link(
    request: Request, runtime: Runtime, signed_in: SignedIn, tenant_id: TenantIdPath
) -> Response:
    await auth.checked_form(request, signed_in)
    async with request.app.state.session_factory() as session:
        await tenant_view.existing(session, tenant_id)
    link = portal_links.issue(
        runtime.signer, tenant_id, runtime.clock_ms(), runtime.settings.portal_link_ttl_s
    )
    await Actions(request, runtime, signed_in).audit(
        "portal link", f"tenant_id={tenant_id}", {"expires_at": link.expires_at_ms}
    )
    return runtime.render(
        "portal_link.html",
        session=signed_in,
        url=str(request.base_url).rstrip("/") + link.path,
        expires_at=link.expires_at_ms,
        back=f"/console/tenants/{tenant_id}",
    )


RULE_KINDS = ("alert", "top_up")


@router.post("/tenants/{tenant_id}/rules/{kind}")
async def set_rule(
    request: Request, runtime: Runtime, signed_in: SignedIn, tenant_id: TenantIdPath, kind: str
) -> Response:
    form = await auth.checked_form(request, signed_in)
    if kind not in RULE_KINDS:
        raise HTTPException(404, f"no rule kind {kind!r}")
    try:
        await Actions(request, runtime, signed_in).set_rule(tenant_id, kind, form)
    except ActionRefused as refusal:
        return _refused(runtime, signed_in, refusal, f"/console/tenants/{tenant_id}")
    return _see(f"/console/tenants/{tenant_id}?done=rule#rules-title")


@router.post("/tenants/{tenant_id}/rules/{kind}/{rule_id}/remove")
async def remove_rule(
    request: Request,
    runtime: Runtime,
    signed_in: SignedIn,
    tenant_id: TenantIdPath,
    kind: str,
    rule_id: Identifier,
) -> Response:
    await auth.checked_form(request, signed_in)
    if kind not in RULE_KINDS:
        raise HTTPException(404, f"no rule kind {kind!r}")
    try:
        await Actions(request, runtime, signed_in).remove_rule(tenant_id, kind, rule_id)
    except ActionRefused as refusal:
        return _refused(runtime, signed_in, refusal, f"/console/tenants/{tenant_id}")
    return _see(f"/console/tenants/{tenant_id}?done=rule-removed#rules-title")
