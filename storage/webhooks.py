"""Tenants' webhook endpoints and the durable state of delivering alerts to them (migration 0015).

    webhook_endpoints   a tenant's endpoint: URL, description, enabled, the alert kinds it wants (NULL:
                        every kind) and its signing secret (`whsec_` + base64, Standard Webhooks)
    webhook_deliveries  one alert to one endpoint, keyed by (endpoint_id, alert_id): its body, built once,
                        and its state: pending (next_attempt_at_ms), delivered or dead (dead-lettered)
    webhook_attempts    every attempt: when, the HTTP status or the error, the latency, the next retry time
                        and what it left the delivery in; the delivery log the admin API pages through

The secret is stored as it is, not hashed: the dispatcher needs it to sign every attempt (HMAC-SHA256).
It leaves this table only in the response that creates or rotates it and in the dispatcher's requests'
signatures; listings and logs never carry it.

Rotation with an overlap (migration 0020): `rotate_secret` makes the current secret the previous one,
which keeps signing beside the new one until `previous_secret_expires_at_ms` (Standard Webhooks: the
`webhook-signature` header carries both, space-delimited, and a receiver accepts either), so a receiver
that has not deployed the new secret yet keeps verifying. Rotating again during an overlap drops the older
secret: at most two ever sign. An overlap of 0 stops the old secret at once.

Why (endpoint_id, alert_id) is the key: an alert id is derived from the rule and the crossing
(ledger.alerts), so a redelivered or replayed alert finds its row and schedules nothing (`schedule` inserts
ON CONFLICT DO NOTHING), and a delivered row is never claimed again. `claim_due` leases due rows (a lease
outlives one request) so two dispatchers, or one restarted while a request was in flight, never send the
same attempt twice; `record_attempt` moves a row only from the attempt it claimed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Identity,
    Index,
    Integer,
    Text,
    UniqueConstraint,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage.base import Base
from storage.projections import write_offsets

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
DELIVERY_STATES = (PENDING, DELIVERED, DEAD)
RETRYING = "retrying"  # an attempt's outcome when another follows
ATTEMPT_OUTCOMES = (DELIVERED, RETRYING, DEAD)
SECRET_OVERLAP_MAX_MS = 7 * 86_400_000  # the longest a rotated-out secret keeps signing (Svix: 7 days too)


class WebhookEndpoint(Base):
    __tablename__ = "webhook_endpoints"

    endpoint_id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(
        Text, ForeignKey("tenants.tenant_id", ondelete="CASCADE"), index=True
    )
    url: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text)
    alert_kinds: Mapped[list[str] | None] = mapped_column(ARRAY(Text))  # NULL: every kind
    secret: Mapped[str] = mapped_column(Text)  # whsec_...: stored as-is, it signs (see the module docstring)
    enabled: Mapped[bool] = mapped_column(Boolean)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    disabled_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    secret_rotated_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    # the secret before the last rotation, signing beside `secret` until previous_secret_expires_at_ms
    previous_secret: Mapped[str | None] = mapped_column(Text)
    previous_secret_expires_at_ms: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        CheckConstraint("length(url) BETWEEN 1 AND 2048", name="url_length"),
        CheckConstraint("secret LIKE 'whsec_%'", name="secret_scheme"),
        CheckConstraint("previous_secret LIKE 'whsec_%'", name="previous_secret_scheme"),
        CheckConstraint(
            "(previous_secret IS NULL) = (previous_secret_expires_at_ms IS NULL)",
            name="previous_secret_expires",
        ),
    )

    def rotate_secret(self, new_secret: str, now_ms: int, overlap_ms: int) -> None:
        """`new_secret` signs from now on; the current one also signs until now + overlap_ms (0: it stops
        at once). A previous secret still in its overlap stops: only the latest previous one is kept."""
        assert 0 <= overlap_ms <= SECRET_OVERLAP_MAX_MS, overlap_ms
        assert new_secret != self.secret, "a rotation changes the secret"
        if overlap_ms > 0:
            self.previous_secret, self.previous_secret_expires_at_ms = self.secret, now_ms + overlap_ms
        else:
            self.previous_secret, self.previous_secret_expires_at_ms = None, None
        self.secret, self.secret_rotated_at_ms = new_secret, now_ms


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"

    endpoint_id: Mapped[str] = mapped_column(
        Text, ForeignKey("webhook_endpoints.endpoint_id", ondelete="CASCADE"), primary_key=True
    )
    alert_id: Mapped[str] = mapped_column(Text, primary_key=True)  # the webhook-id header
    tenant_id: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(Text)  # the body's "type"
    body: Mapped[str] = mapped_column(Text)  # the JSON body, built once: every attempt sends these bytes
    state: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)  # attempts made so far
    alert_partition: Mapped[int] = mapped_column(Integer)  # where the alert is on ledger.alerts: a dead
    alert_offset: Mapped[int] = mapped_column(BigInteger)  # letter on ledger.dlq names it
    scheduled_at_ms: Mapped[int] = mapped_column(BigInteger)  # the give-up time counts from here
    next_attempt_at_ms: Mapped[int | None] = mapped_column(BigInteger)  # pending only
    leased_until_ms: Mapped[int | None] = mapped_column(BigInteger)  # an attempt is in flight until then
    finished_at_ms: Mapped[int | None] = mapped_column(BigInteger)  # delivered or dead
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint("state IN ('pending', 'delivered', 'dead')", name="state_known"),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        CheckConstraint("(state = 'pending') = (next_attempt_at_ms IS NOT NULL)", name="pending_has_next"),
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at_ms",
            postgresql_where=text("state = 'pending'"),
        ),
    )


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"

    attempt_id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(
        Text, ForeignKey("webhook_endpoints.endpoint_id", ondelete="CASCADE")
    )
    alert_id: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer)  # 1 for the first
    at_ms: Mapped[int] = mapped_column(BigInteger)
    status_code: Mapped[int | None] = mapped_column(Integer)  # None: no HTTP response (see error)
    error: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[int] = mapped_column(BigInteger)
    next_retry_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    outcome: Mapped[str] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("endpoint_id", "alert_id", "attempt"),
        CheckConstraint("attempt >= 1", name="attempt_positive"),
        CheckConstraint("outcome IN ('delivered', 'retrying', 'dead')", name="outcome_known"),
        Index("ix_webhook_attempts_endpoint_id_attempt_id", "endpoint_id", "attempt_id"),
    )


# ---- the dispatcher's side -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimed:
    """A due delivery leased to this dispatcher for one attempt."""

    endpoint_id: str
    alert_id: str
    tenant_id: str
    body: str
    attempts: int  # made before this one
    alert_partition: int
    alert_offset: int
    scheduled_at_ms: int
    url: str
    secret: str
    enabled: bool
    previous_secret: str | None  # signs too while now < previous_secret_expires_at_ms
    previous_secret_expires_at_ms: int | None

    def signing_secrets(self, now_ms: int) -> tuple[str, ...]:
        """The secrets an attempt at `now_ms` is signed with: the current one, and the previous one while
        its overlap lasts."""
        expires = self.previous_secret_expires_at_ms
        if self.previous_secret is not None and expires is not None and now_ms < expires:
            return (self.secret, self.previous_secret)
        return (self.secret,)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt did, and the state it leaves the delivery in."""

    at_ms: int
    status_code: int | None
    error: str | None
    latency_ms: int
    state: str  # PENDING (another attempt at next_attempt_at_ms), DELIVERED or DEAD
    next_attempt_at_ms: int | None

    def __post_init__(self) -> None:
        assert self.state in DELIVERY_STATES, self.state
        assert (self.state == PENDING) == (self.next_attempt_at_ms is not None), "pending <=> a next attempt"
        assert self.state != DELIVERED or self.status_code is not None, "delivered: an HTTP response"


async def enabled_endpoints(session: AsyncSession, tenant_ids: Iterable[str]) -> list[WebhookEndpoint]:
    rows = await session.execute(
        select(WebhookEndpoint).where(
            WebhookEndpoint.tenant_id.in_(sorted(set(tenant_ids))), WebhookEndpoint.enabled.is_(True)
        )
    )
    return list(rows.scalars())


async def schedule(
    session: AsyncSession,
    deliveries: Sequence[dict],
    consumer_name: str,
    next_offsets: dict[tuple[str, int], int],
) -> None:
    """In the caller's transaction: the deliveries (a row that exists is left as it is) and the consumer's
    next offsets, so the offsets advance only with the deliveries they scheduled."""
    if deliveries:
        await session.execute(insert(WebhookDelivery).on_conflict_do_nothing(), list(deliveries))
    await write_offsets(session, consumer_name, next_offsets)


# The due rows, at most `per_endpoint` in flight per endpoint: rows already leased rank first in their
# endpoint, so an endpoint with `per_endpoint` requests in flight gets no more, and a slow or dead endpoint
# takes at most its share of `limit`. The outer WHERE re-checks the lease on the row it locks, so two
# dispatchers claiming at once never both get a row.
_CLAIM = text(
    """
    WITH ranked AS (
        SELECT d.endpoint_id, d.alert_id, d.leased_until_ms, d.next_attempt_at_ms,
               row_number() OVER (
                   PARTITION BY d.endpoint_id
                   ORDER BY (coalesce(d.leased_until_ms, 0) > :now) DESC, d.next_attempt_at_ms, d.alert_id
               ) AS place
        FROM webhook_deliveries d
        WHERE d.state = 'pending'
          AND (d.next_attempt_at_ms <= :now OR coalesce(d.leased_until_ms, 0) > :now)
    ), wanted AS (
        SELECT endpoint_id, alert_id FROM ranked
        WHERE place <= :per_endpoint AND coalesce(leased_until_ms, 0) <= :now
        ORDER BY next_attempt_at_ms
        LIMIT :limit
    )
    UPDATE webhook_deliveries AS d
    SET leased_until_ms = :lease_until
    FROM wanted, webhook_endpoints AS e
    WHERE d.endpoint_id = wanted.endpoint_id AND d.alert_id = wanted.alert_id
      AND e.endpoint_id = d.endpoint_id
      AND d.state = 'pending' AND coalesce(d.leased_until_ms, 0) <= :now
    RETURNING d.endpoint_id, d.alert_id, d.tenant_id, d.body, d.attempts, d.alert_partition,
              d.alert_offset, d.scheduled_at_ms,
              e.url, e.secret, e.enabled, e.previous_secret, e.previous_secret_expires_at_ms
    """
)


async def claim_due(
    session: AsyncSession, now_ms: int, lease_ms: int, limit: int, per_endpoint: int
) -> list[Claimed]:
    """Lease up to `limit` due deliveries until now + lease_ms (the caller's transaction)."""
    assert limit >= 0 and per_endpoint >= 1 and lease_ms >= 1, (limit, per_endpoint, lease_ms)
    if limit == 0:
        return []
    rows = await session.execute(
        _CLAIM,
        {"now": now_ms, "lease_until": now_ms + lease_ms, "limit": limit, "per_endpoint": per_endpoint},
    )
    return [Claimed(*row) for row in rows]


async def next_due_ms(session: AsyncSession) -> int | None:
    """When the earliest pending delivery can next be claimed (its next attempt's time, or its lease's end
    if later); None when nothing is pending."""
    return await session.scalar(
        select(
            func.min(
                func.greatest(
                    WebhookDelivery.next_attempt_at_ms, func.coalesce(WebhookDelivery.leased_until_ms, 0)
                )
            )
        ).where(WebhookDelivery.state == PENDING)
    )


async def record_attempt(session: AsyncSession, claimed: Claimed, outcome: Outcome) -> bool:
    """Write the attempt and move the delivery, only from the attempt this dispatcher claimed; False when
    the row moved meanwhile (the lease ran out and another attempt was recorded), writing nothing."""
    finished = outcome.at_ms if outcome.state != PENDING else None
    moved = await session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.endpoint_id == claimed.endpoint_id,
            WebhookDelivery.alert_id == claimed.alert_id,
            WebhookDelivery.state == PENDING,
            WebhookDelivery.attempts == claimed.attempts,
        )
        .values(
            state=outcome.state,
            attempts=claimed.attempts + 1,
            next_attempt_at_ms=outcome.next_attempt_at_ms,
            leased_until_ms=None,
            finished_at_ms=finished,
            last_status=outcome.status_code,
            last_error=outcome.error,
        )
    )
    if moved.rowcount != 1:
        return False
    session.add(
        WebhookAttempt(
            endpoint_id=claimed.endpoint_id,
            alert_id=claimed.alert_id,
            attempt=claimed.attempts + 1,
            at_ms=outcome.at_ms,
            status_code=outcome.status_code,
            error=outcome.error,
            latency_ms=outcome.latency_ms,
            next_retry_at_ms=outcome.next_attempt_at_ms,
            outcome=RETRYING if outcome.state == PENDING else outcome.state,
        )
    )
    return True


async def prune_attempts(session: AsyncSession, before_ms: int, limit: int) -> int:
    """Delete up to `limit` of the oldest attempts made before `before_ms`; how many it deleted."""
    oldest = (
        select(WebhookAttempt.attempt_id)
        .where(WebhookAttempt.at_ms < before_ms)
        .order_by(WebhookAttempt.attempt_id)
        .limit(limit)
    )
    deleted = await session.execute(delete(WebhookAttempt).where(WebhookAttempt.attempt_id.in_(oldest)))
    return deleted.rowcount


async def forget_expired_secrets(session: AsyncSession, now_ms: int) -> int:
    """Erase the previous secrets whose overlap has ended (they sign nothing more); how many."""
    erased = await session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.previous_secret_expires_at_ms <= now_ms)
        .values(previous_secret=None, previous_secret_expires_at_ms=None)
    )
    return erased.rowcount


# ---- the admin API's side --------------------------------------------------------------------------------


async def attempts_page(
    session: AsyncSession, endpoint_id: str, after_attempt_id: int, limit: int
) -> list[tuple[WebhookAttempt, str]]:
    """The endpoint's attempts after `after_attempt_id`, oldest first, each with its delivery's state."""
    rows = await session.execute(
        select(WebhookAttempt, WebhookDelivery.state)
        .join(
            WebhookDelivery,
            (WebhookDelivery.endpoint_id == WebhookAttempt.endpoint_id)
            & (WebhookDelivery.alert_id == WebhookAttempt.alert_id),
        )
        .where(WebhookAttempt.endpoint_id == endpoint_id, WebhookAttempt.attempt_id > after_attempt_id)
        .order_by(WebhookAttempt.attempt_id)
        .limit(limit)
    )
    return [(attempt, state) for attempt, state in rows]
