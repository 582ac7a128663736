"""Admin writes: tenants, keys, grants and voids. Each function runs inside the caller's transaction.

Grant and void ids are derived from what makes the request unique (tenant + Idempotency-Key, grant),
so a retry after any failure, even one between publishing and recording that it was published,
re-emits the same event id, which every consumer treats as a duplicate.

Claim, then publish under a lock: a grant is first recorded (its own transaction, under the tenant's
row lock, which also serialises the tenant's credit bound); then `unpublished_grant` locks the grant's
row (SELECT ... FOR UPDATE) for the publish and its mark. Concurrent retries of one grant wait on
that lock and find it published: one event, however many retries race. `grant_credit`, `void_grant`
and `revoke_and_announce` are those steps end to end (record -> publish -> mark published), each in
its own transactions; the rest are the steps, each inside the caller's transaction.

A publish the event bus does not accept within `publish_timeout_ms` is a 503 (retry with the same
request): the record stays, unpublished, and the retry publishes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable

from fastapi import HTTPException, status
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.admin.errors import AdminError
from gateway.admin.models import GrantCreate, TenantCreate
from gateway.admin.publisher import EventPublisher
from gateway.admin.settings import AdminSettings
from gateway.api_keys import GeneratedKey, generate_api_key
from ledger.events import TENANT_CREDIT_MAX, CreditGranted, GrantVoided
from storage.tenants import ApiKey, Grant, Tenant
from streams.records import ApiKeyRevoked, encode_revocation

logger = logging.getLogger(__name__)

PUBLISH_RETRY_AFTER_S = 1
Sessions = async_sessionmaker[AsyncSession]


async def accepted(sending: Awaitable[object], what: str, timeout_ms: int) -> None:
    """Await a publish within `timeout_ms`, or answer 503 (retry) saying why."""
    try:
        async with asyncio.timeout(timeout_ms / 1000):
            await sending
    except Exception as error:
        logger.warning("publishing %s failed: %r", what, error)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail={"field": None, "message": f"the event bus did not accept the event ({error!r}); retry"},
            headers={"Retry-After": str(PUBLISH_RETRY_AFTER_S)},
        ) from error


async def grant_credit(
    sessions: Sessions,
    publisher: EventPublisher,
    settings: AdminSettings,
    clock_ms: Callable[[], int],
    tenant_id: str,
    idempotency_key: str,
    request: GrantCreate,
) -> tuple[Grant, bool]:
    """Record the grant, publish its CreditGranted, mark it published; True when the grant is new."""
    async with sessions() as session, session.begin():
        grant, created = await record_grant(
            session, tenant_id, idempotency_key, request, settings.grant_amount_max, clock_ms()
        )
    if grant.published_at_ms is None:
        async with sessions() as session, session.begin():
            unpublished = await unpublished_grant(session, grant.grant_id)
            if unpublished is not None:  # else a concurrent retry published it while we waited
                event = granted_event(unpublished)
                await accepted(publisher.publish(event), event.event_id, settings.publish_timeout_ms)
                await mark_grant_published(session, grant.grant_id, clock_ms())
    return grant, created


async def void_grant(
    sessions: Sessions,
    publisher: EventPublisher,
    settings: AdminSettings,
    clock_ms: Callable[[], int],
    grant_id: str,
) -> Grant:
    """Record the void, publish its GrantVoided, mark it published; voiding again returns the first void."""
    async with sessions() as session, session.begin():
        grant = await record_void(session, grant_id, clock_ms())
    if grant.void_published_at_ms is None:
        async with sessions() as session, session.begin():
            unpublished = await unpublished_void(session, grant.grant_id)
            if unpublished is not None:  # else a concurrent retry published it while we waited
                event = voided_event(unpublished)
                await accepted(publisher.publish(event), event.event_id, settings.publish_timeout_ms)
                await mark_void_published(session, grant.grant_id, clock_ms())
    return grant


async def revoke_and_announce(
    sessions: Sessions,
    publisher: EventPublisher,
    settings: AdminSettings,
    clock_ms: Callable[[], int],
    key_id: str,
) -> ApiKey:
    """Revoke the key, then announce it on `tenant.keys` (every gateway drops it from its cache).
    Revoking again announces the first revocation again."""
    async with sessions() as session, session.begin():
        api_key = await revoke_key(session, key_id, clock_ms())
    record = encode_revocation(revoked_record(api_key))
    sending = publisher.append(publisher.topics.keys, api_key.key_id.encode(), record)
    await accepted(sending, f"revocation of {api_key.key_id}", settings.publish_timeout_ms)
    return api_key


async def create_tenant(
    session: AsyncSession, request: TenantCreate, tiers: tuple[str, ...], now_ms: int
) -> Tenant:
    if request.tier not in tiers:
        raise AdminError(422, "tier", f"must be one of {', '.join(tiers)}")
    tenant = Tenant(
        tenant_id=f"tn_{secrets.token_hex(8)}", name=request.name, tier=request.tier, created_at_ms=now_ms
    )
    session.add(tenant)
    await session.flush()
    return tenant


async def existing_tenant(session: AsyncSession, tenant_id: str, *, lock: bool = False) -> Tenant:
    """The tenant, or a 404. `lock`: hold its row until the transaction ends (serialises its grants)."""
    tenant = await session.get(Tenant, tenant_id, with_for_update=lock)
    if tenant is None:
        raise AdminError(404, "tenant_id", f"no tenant {tenant_id!r}")
    return tenant


async def issue_key(
    session: AsyncSession,
    tenant_id: str,
    now_ms: int,
    daily_credits: int | None = None,
    monthly_credits: int | None = None,
) -> tuple[ApiKey, GeneratedKey]:
    """A new key, with its spend limits in credits per UTC day and month when given (None: no limit)."""
    await existing_tenant(session, tenant_id)
    generated = generate_api_key()
    api_key = ApiKey(
        key_id=generated.key_id,
        tenant_id=tenant_id,
        prefix=generated.prefix,
        secret_sha256=generated.secret_sha256,
        created_at_ms=now_ms,
        revoked_at_ms=None,
        daily_credits=daily_credits,
        monthly_credits=monthly_credits,
    )
    session.add(api_key)
    await session.flush()
    return api_key, generated


async def set_key_budget(
    session: AsyncSession, key_id: str, daily_credits: int | None, monthly_credits: int | None
) -> ApiKey:
    """Replace the key's spend limits (None: no limit). Gateways see it within their auth cache's ttl;
    strict admission reads the limits from the key's row at each reservation."""
    api_key = await session.get(ApiKey, key_id, with_for_update=True)
    if api_key is None:
        raise AdminError(404, "key_id", f"no key {key_id!r}")
    api_key.daily_credits = daily_credits
    api_key.monthly_credits = monthly_credits
    await session.flush()
    return api_key


async def revoke_key(session: AsyncSession, key_id: str, now_ms: int) -> ApiKey:
    """Revoke once; revoking again returns the first revocation."""
    await session.execute(
        update(ApiKey)
        .where(ApiKey.key_id == key_id, ApiKey.revoked_at_ms.is_(None))
        .values(revoked_at_ms=now_ms)
    )
    api_key = await session.get(ApiKey, key_id, populate_existing=True)
    if api_key is None:
        raise AdminError(404, "key_id", f"no key {key_id!r}")
    return api_key


def revoked_record(api_key: ApiKey) -> ApiKeyRevoked:
    assert api_key.revoked_at_ms is not None, f"key {api_key.key_id} is not revoked"
    return ApiKeyRevoked(key_id=api_key.key_id, tenant_id=api_key.tenant_id, revoked_at=api_key.revoked_at_ms)


def grant_identity(tenant_id: str, idempotency_key: str) -> tuple[str, str]:
    """(grant_id, event_id) for a tenant's grant request with this Idempotency-Key."""
    digest = hashlib.sha256(f"{tenant_id}\x00{idempotency_key}".encode()).hexdigest()[:32]
    return f"gr_{digest}", f"ev_grant_{digest}"


def request_fingerprint(request: GrantCreate) -> bytes:
    body = request.model_dump()
    if not body["models"]:
        del body["models"]  # an unscoped grant's fingerprint as before models existed (retries still match)
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()


async def record_grant(
    session: AsyncSession,
    tenant_id: str,
    idempotency_key: str,
    request: GrantCreate,
    amount_max: int,
    now_ms: int,
) -> tuple[Grant, bool]:
    """The grant for this Idempotency-Key, recorded now or by an earlier request; True when new."""
    if request.amount > amount_max:
        raise AdminError(422, "amount", f"must be at most {amount_max}")
    effective_at_ms = request.effective_at if request.effective_at is not None else now_ms
    if request.expires_at is not None and request.expires_at <= effective_at_ms:
        raise AdminError(422, "expires_at", f"must be after effective_at ({effective_at_ms})")
    if request.category == "paid" and (request.price is None or request.currency is None):
        raise AdminError(422, "price", "a paid grant needs a price and a currency")
    if request.category == "promotional" and request.price is not None:
        raise AdminError(422, "price", "a promotional grant has no price")
    await existing_tenant(session, tenant_id, lock=True)
    grant_id, event_id = grant_identity(tenant_id, idempotency_key)
    fingerprint = request_fingerprint(request)
    existing = await session.get(Grant, grant_id)
    if existing is None:
        await refuse_above_tenant_credit_max(session, tenant_id, request.amount)
    inserted = await session.execute(
        insert(Grant)
        .values(
            grant_id=grant_id,
            tenant_id=tenant_id,
            event_id=event_id,
            amount=request.amount,
            effective_at_ms=effective_at_ms,
            expires_at_ms=request.expires_at,
            priority=request.priority,
            category=request.category,
            price=request.price,
            currency=request.currency,
            reference=request.reference,
            models=request.models,
            idempotency_key=idempotency_key,
            request_sha256=fingerprint,
            created_at_ms=now_ms,
        )
        .on_conflict_do_nothing(index_elements=[Grant.tenant_id, Grant.idempotency_key])
        .returning(Grant.grant_id)
    )
    created = inserted.first() is not None
    grant = (
        await session.execute(
            select(Grant).where(Grant.grant_id == grant_id).execution_options(populate_existing=True)
        )
    ).scalar_one()
    if grant.request_sha256 != fingerprint:
        raise AdminError(409, "Idempotency-Key", "was already used for a grant with a different body")
    return grant, created


async def refuse_above_tenant_credit_max(session: AsyncSession, tenant_id: str, amount: int) -> None:
    """The fold refuses a grant that takes a tenant's total granted (voided and expired grants too) above
    TENANT_CREDIT_MAX; refuse it here first, naming the amount. The caller holds the tenant's row lock."""
    granted = (
        await session.execute(
            select(func.coalesce(func.sum(Grant.amount), 0)).where(Grant.tenant_id == tenant_id)
        )
    ).scalar_one()
    if granted + amount > TENANT_CREDIT_MAX:
        raise AdminError(
            422,
            "amount",
            f"would take the tenant's total granted ({granted}) above {TENANT_CREDIT_MAX} "
            f"(at most {TENANT_CREDIT_MAX - granted} more can be granted)",
        )


async def unpublished_grant(session: AsyncSession, grant_id: str) -> Grant | None:
    """The grant, its row locked until the transaction ends, when its CreditGranted is still to publish."""
    grant = await session.get(Grant, grant_id, with_for_update=True, populate_existing=True)
    assert grant is not None, f"grant {grant_id} vanished"
    return grant if grant.published_at_ms is None else None


async def unpublished_void(session: AsyncSession, grant_id: str) -> Grant | None:
    """The voided grant, its row locked until the transaction ends, when its GrantVoided is still to
    publish."""
    grant = await session.get(Grant, grant_id, with_for_update=True, populate_existing=True)
    assert grant is not None, f"grant {grant_id} vanished"
    assert grant.voided_at_ms is not None, f"grant {grant_id} is not voided"
    return grant if grant.void_published_at_ms is None else None


def granted_event(grant: Grant) -> CreditGranted:
    return CreditGranted(
        event_id=grant.event_id,
        tenant_id=grant.tenant_id,
        grant_id=grant.grant_id,
        amount=grant.amount,
        effective_at=grant.effective_at_ms,
        expires_at=grant.expires_at_ms,
        priority=grant.priority,
        category=grant.category,
        price=grant.price,
        currency=grant.currency,
        reference=grant.reference,
        models=tuple(grant.models),
    )


async def mark_grant_published(session: AsyncSession, grant_id: str, now_ms: int) -> None:
    await session.execute(
        update(Grant)
        .where(Grant.grant_id == grant_id, Grant.published_at_ms.is_(None))
        .values(published_at_ms=now_ms)
    )


async def record_void(session: AsyncSession, grant_id: str, now_ms: int) -> Grant:
    """Void once, from now on; voiding again returns the first void."""
    await session.execute(
        update(Grant)
        .where(Grant.grant_id == grant_id, Grant.voided_at_ms.is_(None))
        .values(voided_at_ms=now_ms, void_event_id=f"ev_void_{grant_id}")
    )
    grant = await session.get(Grant, grant_id, populate_existing=True)
    if grant is None:
        raise AdminError(404, "grant_id", f"no grant {grant_id!r}")
    return grant


def voided_event(grant: Grant) -> GrantVoided:
    assert grant.voided_at_ms is not None, f"grant {grant.grant_id} is not voided"
    assert grant.void_event_id is not None, f"voided grant {grant.grant_id} has no void event id"
    return GrantVoided(
        event_id=grant.void_event_id,
        tenant_id=grant.tenant_id,
        grant_id=grant.grant_id,
        voided_at=grant.voided_at_ms,
    )


async def mark_void_published(session: AsyncSession, grant_id: str, now_ms: int) -> None:
    await session.execute(
        update(Grant)
        .where(Grant.grant_id == grant_id, Grant.void_published_at_ms.is_(None))
        .values(void_published_at_ms=now_ms)
    )
