"""The admin API's webhook endpoints: where a tenant's alerts are delivered (streams.webhooks), and the
delivery log.

    POST   /admin/v1/tenants/{tenant_id}/webhooks    {"url", "description", "alert_kinds"} -> the endpoint and
                                                     its secret, once (operator)
    GET    /admin/v1/tenants/{tenant_id}/webhooks    the tenant's endpoints, never their secrets
    GET    /admin/v1/webhooks/{endpoint_id}
    DELETE /admin/v1/webhooks/{endpoint_id}          disable: nothing more is sent; the log stays (operator)
    POST   /admin/v1/webhooks/{endpoint_id}/rotate-secret   {"overlap_ms"} (optional) -> a new secret, once;
                                                     the old one keeps signing beside it for overlap_ms
                                                     (operator)
    GET    /admin/v1/webhooks/{endpoint_id}/deliveries?since=&limit=   every attempt, oldest first

The secret is `whsec_` + base64 of SECRET_BYTES random bytes (Standard Webhooks). It is stored as it is
(the dispatcher signs with it: storage.webhooks says why it is not hashed) and appears only in the create
and rotate responses (`Cache-Control: no-store`); the audit log keeps the request bodies, which never
carry it. Operators create, disable and rotate; finance credentials read (gateway.admin.principals).

Rotation keeps the old secret signing for an overlap (default TOLLGATE_ADMIN_WEBHOOK_SECRET_OVERLAP_MS, 24 h;
at most storage.webhooks.SECRET_OVERLAP_MAX_MS, 7 days; 0 stops it at once), as Svix and Stripe do: every
attempt until then carries both signatures, so a receiver holding either secret verifies it and can deploy
the new one without losing a delivery. The endpoint's view says until when (`previous_secret_expires_at`).
"""

from __future__ import annotations

import base64
import secrets
import uuid
from typing import Annotated
from urllib.parse import urlsplit

import httpx
from fastapi import APIRouter, Depends, Query, Response, status
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import select

from gateway.admin import commands
from gateway.admin.deps import Clock, Identifier, Sessions, Settings, TenantIdPath, require_admin
from gateway.admin.errors import ERROR_RESPONSES, AdminError, AdminRoute
from gateway.admin.models import PlainText
from ledger.alerts import AlertKind
from storage.webhooks import SECRET_OVERLAP_MAX_MS, WebhookEndpoint, attempts_page

router = APIRouter(
    prefix="/admin/v1",
    tags=["admin"],
    route_class=AdminRoute,
    dependencies=[Depends(require_admin)],
    responses=ERROR_RESPONSES,
)

SECRET_SCHEME = "whsec_"
SECRET_BYTES = 32  # Standard Webhooks: 24 to 64 bytes
URL_CHARS_MAX = 2_048
DESCRIPTION_CHARS_MAX = 500
ENDPOINTS_PER_TENANT_MAX = 20  # enabled ones
ENDPOINTS_LISTED_MAX = 200  # a listing, disabled ones included
DELIVERIES_PAGE_MAX = 500
ALERT_KINDS_LISTED_MAX = 32  # entries of alert_kinds (repeats allowed, kept once)


def new_secret() -> str:
    return SECRET_SCHEME + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials; the signature authenticates the request")
    try:
        httpx.URL(value)  # what the dispatcher will request: refused here rather than at every attempt
    except httpx.InvalidURL as error:
        raise ValueError(f"not a URL the dispatcher can request: {error}") from None
    return value


EndpointUrl = Annotated[PlainText, Field(min_length=1, max_length=URL_CHARS_MAX), AfterValidator(http_url)]


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: EndpointUrl
    description: PlainText = Field(default="", max_length=DESCRIPTION_CHARS_MAX)
    alert_kinds: list[AlertKind] | None = Field(
        default=None,
        min_length=1,
        max_length=ALERT_KINDS_LISTED_MAX,
        description="the alert kinds to deliver; default every kind",
    )


class EndpointView(BaseModel):
    endpoint_id: str
    tenant_id: str
    url: str
    description: str
    alert_kinds: list[str] | None
    enabled: bool
    created_at: int
    disabled_at: int | None
    secret_rotated_at: int | None
    previous_secret_expires_at: int | None = Field(
        description="the secret before the last rotation signs beside the current one until then (past: "
        "it has stopped); null: only the current secret signs"
    )


class EndpointCreated(EndpointView):
    secret: str = Field(description="whsec_...: verify the webhook-signature header with it; shown once")


class SecretRotation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overlap_ms: int | None = Field(
        default=None,
        ge=0,
        le=SECRET_OVERLAP_MAX_MS,
        description="how long the old secret keeps signing beside the new one; 0: it stops at once; "
        "default TOLLGATE_ADMIN_WEBHOOK_SECRET_OVERLAP_MS",
    )


class SecretRotated(EndpointCreated):
    old_secret_stops_at: int = Field(
        description="when the replaced secret stops signing: the rotation's time when overlap_ms is 0"
    )


class DeliveryAttemptView(BaseModel):
    sequence: int = Field(description="the page cursor: pass the last one as `since`")
    alert_id: str
    attempt: int
    at: int
    status_code: int | None
    error: str | None
    latency_ms: int
    next_retry_at: int | None
    outcome: str = Field(description="delivered, retrying or dead (this attempt)")
    delivery_state: str = Field(description="pending, delivered or dead (the delivery, now)")


class DeliveriesPage(BaseModel):
    attempts: list[DeliveryAttemptView]
    next_since: int


def view(row: WebhookEndpoint) -> EndpointView:
    return EndpointView(
        endpoint_id=row.endpoint_id,
        tenant_id=row.tenant_id,
        url=row.url,
        description=row.description,
        alert_kinds=row.alert_kinds,
        enabled=row.enabled,
        created_at=row.created_at_ms,
        disabled_at=row.disabled_at_ms,
        secret_rotated_at=row.secret_rotated_at_ms,
        previous_secret_expires_at=row.previous_secret_expires_at_ms,
    )


def created(row: WebhookEndpoint, response: Response) -> EndpointCreated:
    response.headers["Cache-Control"] = "no-store"
    return EndpointCreated(**view(row).model_dump(), secret=row.secret)


async def existing_endpoint(session, endpoint_id: str, *, lock: bool = False) -> WebhookEndpoint:
    row = await session.get(WebhookEndpoint, endpoint_id, with_for_update=lock)
    if row is None:
        raise AdminError(404, "endpoint_id", f"no webhook endpoint {endpoint_id!r}")
    return row


@router.post(
    "/tenants/{tenant_id}/webhooks", status_code=status.HTTP_201_CREATED, response_model=EndpointCreated
)
async def create_endpoint(
    tenant_id: TenantIdPath, body: EndpointCreate, sessions: Sessions, clock: Clock, response: Response
) -> EndpointCreated:
    """Register an endpoint for the tenant's alerts. The secret is in this response only: keep it."""
    async with sessions() as session, session.begin():
        await commands.existing_tenant(session, tenant_id, lock=True)
        endpoints = await _tenant_endpoints(session, tenant_id)
        if sum(row.enabled for row in endpoints) >= ENDPOINTS_PER_TENANT_MAX:
            raise AdminError(409, "tenant_id", f"at most {ENDPOINTS_PER_TENANT_MAX} enabled endpoints")
        row = WebhookEndpoint(
            endpoint_id="we_" + uuid.uuid4().hex,
            tenant_id=tenant_id,
            url=body.url,
            description=body.description,
            alert_kinds=sorted(set(body.alert_kinds)) if body.alert_kinds is not None else None,
            secret=new_secret(),
            enabled=True,
            created_at_ms=clock(),
        )
        session.add(row)
    return created(row, response)


@router.get("/tenants/{tenant_id}/webhooks", response_model=list[EndpointView])
async def list_endpoints(tenant_id: TenantIdPath, sessions: Sessions) -> list[EndpointView]:
    async with sessions() as session:
        await commands.existing_tenant(session, tenant_id)
        return [view(row) for row in await _tenant_endpoints(session, tenant_id)]


@router.get("/webhooks/{endpoint_id}", response_model=EndpointView)
async def get_endpoint(endpoint_id: Identifier, sessions: Sessions) -> EndpointView:
    async with sessions() as session:
        return view(await existing_endpoint(session, endpoint_id))


@router.delete("/webhooks/{endpoint_id}", response_model=EndpointView)
async def disable_endpoint(endpoint_id: Identifier, sessions: Sessions, clock: Clock) -> EndpointView:
    """Disable the endpoint: no new deliveries, and pending ones are dead-lettered at their next attempt
    ("endpoint disabled"). Its delivery log stays readable. Disabling again changes nothing."""
    async with sessions() as session, session.begin():
        row = await existing_endpoint(session, endpoint_id, lock=True)
        if row.enabled:
            row.enabled, row.disabled_at_ms = False, clock()
    return view(row)


@router.post("/webhooks/{endpoint_id}/rotate-secret", response_model=SecretRotated)
async def rotate_secret(
    endpoint_id: Identifier,
    sessions: Sessions,
    clock: Clock,
    settings: Settings,
    response: Response,
    body: SecretRotation | None = None,
) -> SecretRotated:
    """A new secret, in this response only. Every attempt from now on is signed with it and, for
    `overlap_ms`, with the old one too; a secret still signing from an earlier rotation stops."""
    overlap_ms = settings.webhook_secret_overlap_ms
    if body is not None and body.overlap_ms is not None:
        overlap_ms = body.overlap_ms
    now = clock()
    async with sessions() as session, session.begin():
        row = await existing_endpoint(session, endpoint_id, lock=True)
        row.rotate_secret(new_secret(), now, overlap_ms)
    return SecretRotated(**created(row, response).model_dump(), old_secret_stops_at=now + overlap_ms)


@router.get("/webhooks/{endpoint_id}/deliveries", response_model=DeliveriesPage)
async def list_deliveries(
    endpoint_id: Identifier,
    sessions: Sessions,
    since: Annotated[int, Query(ge=0, le=2**63 - 1, description="the last `sequence` already read")] = 0,
    limit: Annotated[int, Query(ge=1, le=DELIVERIES_PAGE_MAX)] = 100,
) -> DeliveriesPage:
    """The endpoint's delivery log: every attempt, oldest first, with the delivery's state now."""
    async with sessions() as session:
        await existing_endpoint(session, endpoint_id)
        rows = await attempts_page(session, endpoint_id, since, limit)
    attempts = [
        DeliveryAttemptView(
            sequence=attempt.attempt_id,
            alert_id=attempt.alert_id,
            attempt=attempt.attempt,
            at=attempt.at_ms,
            status_code=attempt.status_code,
            error=attempt.error,
            latency_ms=attempt.latency_ms,
            next_retry_at=attempt.next_retry_at_ms,
            outcome=attempt.outcome,
            delivery_state=state,
        )
        for attempt, state in rows
    ]
    return DeliveriesPage(attempts=attempts, next_since=attempts[-1].sequence if attempts else since)


async def _tenant_endpoints(session, tenant_id: str) -> list[WebhookEndpoint]:
    rows = await session.execute(
        select(WebhookEndpoint)
        .where(WebhookEndpoint.tenant_id == tenant_id)
        .order_by(WebhookEndpoint.created_at_ms, WebhookEndpoint.endpoint_id)
        .limit(ENDPOINTS_LISTED_MAX)
    )
    return list(rows.scalars())
