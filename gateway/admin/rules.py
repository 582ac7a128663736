"""The admin API's alert and auto top-up rules: each change is a rule event on `ledger.events`, published
through the grants' command path (`commands.accepted`, the tenant checked first), so every replay of the
log folds the same rules (ledger.rules) and the processor evaluates them as it folds.

    PUT    /admin/v1/tenants/{tenant_id}/alert-rules/{rule_id}    AlertRuleSet
    DELETE /admin/v1/tenants/{tenant_id}/alert-rules/{rule_id}    AlertRuleRemoved
    GET    /admin/v1/tenants/{tenant_id}/alert-rules
    PUT    /admin/v1/tenants/{tenant_id}/top-up-rules/{rule_id}   TopUpRuleSet
    DELETE /admin/v1/tenants/{tenant_id}/top-up-rules/{rule_id}   TopUpRuleRemoved
    GET    /admin/v1/tenants/{tenant_id}/top-up-rules

Writes need an operator credential (finance is read-only: gateway.admin.credentials) and are recorded in
the admin audit log with the event ids they published (AdminRoute). The GETs answer the rules as folded
from the events' own projection (ledger_events, which the projector archives in log order): the same fold
(`ledger.rules.rules_of`) over the same events the processor folds, so the API can never show a rule the
processor does not hold, and no second table has to be kept in step. A PUT shows in the GET once the
projector has archived its event (normally within a second).

Alert and top-up rules share one namespace of rule ids (an alert's id is `{tenant}:{rule}:{crossing}`):
a PUT of an alert rule under the id of a top-up rule (or the reverse) is a 409.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

import msgspec
from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from gateway.admin import commands
from gateway.admin.deps import Clock, Publisher, Sessions, Settings, TenantIdPath, require_admin
from gateway.admin.errors import ERROR_RESPONSES, AdminError, AdminRoute, ErrorBody
from ledger.codec import decode_event
from ledger.events import (
    AMOUNT_MAX,
    MONTHLY_COUNT_MAX,
    PERCENT_MAX,
    PRICE_MAX,
    RULE_ID_PATTERN,
    WINDOW_MAX_MS,
    AlertRuleRemoved,
    AlertRuleSet,
    InvalidEvent,
    RuleEvent,
    TopUpRuleRemoved,
    TopUpRuleSet,
    validated,
)
from ledger.rules import TenantRules, rules_of
from storage.projections import LedgerEvent

RULE_EVENT_TAGS = tuple(
    cls.__struct_config__.tag for cls in (AlertRuleSet, AlertRuleRemoved, TopUpRuleSet, TopUpRuleRemoved)
)
RuleIdPath = Annotated[str, Path(pattern=RULE_ID_PATTERN)]
NOT_PUBLISHED = {"model": ErrorBody, "description": "the event bus did not accept the event; retry"}
OTHER_KIND = {"model": ErrorBody, "description": "the rule id is held by a rule of the other kind"}

router = APIRouter(
    prefix="/admin/v1",
    tags=["admin"],
    route_class=AdminRoute,
    dependencies=[Depends(require_admin)],
    responses=ERROR_RESPONSES,
)


class AlertRuleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["balance_below", "balance_below_percent", "depleted", "grant_expiring"]
    threshold: int | None = Field(
        default=None, ge=0, le=AMOUNT_MAX, description=f"credits, or a percent (1..{PERCENT_MAX})"
    )
    window_ms: int | None = Field(
        default=None, gt=0, le=WINDOW_MAX_MS, description="grant_expiring: how long before the expiry"
    )


class AlertRuleView(AlertRuleBody):
    tenant_id: str
    rule_id: str
    event_id: str
    set_at: int


class TopUpRuleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: int = Field(gt=0, le=AMOUNT_MAX, description="top up when the settled balance falls below")
    amount: int | None = Field(default=None, gt=0, le=AMOUNT_MAX, description="grant this many credits")
    target: int | None = Field(default=None, gt=0, le=AMOUNT_MAX, description="or enough to reach this")
    category: Literal["paid", "promotional"] = "paid"
    price: int | None = Field(
        default=None, ge=0, le=PRICE_MAX, description="of `amount`, or of `target` credits (prorated)"
    )
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")
    monthly_count_max: int | None = Field(default=None, ge=1, le=MONTHLY_COUNT_MAX)
    monthly_price_max: int | None = Field(default=None, ge=0, le=PRICE_MAX)


class TopUpRuleView(TopUpRuleBody):
    tenant_id: str
    rule_id: str
    event_id: str
    set_at: int


class RuleRemoved(BaseModel):
    tenant_id: str
    rule_id: str
    event_id: str
    removed_at: int


@router.put(
    "/tenants/{tenant_id}/alert-rules/{rule_id}",
    response_model=AlertRuleView,
    responses={409: OTHER_KIND, 503: NOT_PUBLISHED},
)
async def put_alert_rule(
    tenant_id: TenantIdPath,
    rule_id: RuleIdPath,
    body: AlertRuleBody,
    sessions: Sessions,
    publisher: Publisher,
    settings: Settings,
    clock: Clock,
) -> AlertRuleView:
    """Set (or replace) an alert rule: AlertRuleSet on ledger.events."""
    rules = await folded_rules(sessions, tenant_id)
    if any(rule.rule_id == rule_id for rule in rules.top_up_rules()):
        raise AdminError(409, "rule_id", f"{rule_id!r} is a top-up rule; remove it first")
    event = await _publish_set(
        AlertRuleSet, "alert-rule-set", tenant_id, rule_id, body, publisher, settings, clock
    )
    return alert_rule_view(event)


@router.delete(
    "/tenants/{tenant_id}/alert-rules/{rule_id}", response_model=RuleRemoved, responses={503: NOT_PUBLISHED}
)
async def delete_alert_rule(
    tenant_id: TenantIdPath,
    rule_id: RuleIdPath,
    sessions: Sessions,
    publisher: Publisher,
    settings: Settings,
    clock: Clock,
) -> RuleRemoved:
    """Remove an alert rule (AlertRuleRemoved); removing one that is not there changes nothing."""
    await folded_rules(sessions, tenant_id)  # the tenant exists
    return await _publish_removed(
        AlertRuleRemoved, "alert-rule-removed", tenant_id, rule_id, publisher, settings, clock
    )


@router.get("/tenants/{tenant_id}/alert-rules", response_model=list[AlertRuleView])
async def list_alert_rules(tenant_id: TenantIdPath, sessions: Sessions) -> list[AlertRuleView]:
    """The tenant's alert rules as folded from its archived rule events, in the order first set."""
    return [alert_rule_view(rule) for rule in (await folded_rules(sessions, tenant_id)).alert_rules()]


@router.put(
    "/tenants/{tenant_id}/top-up-rules/{rule_id}",
    response_model=TopUpRuleView,
    responses={409: OTHER_KIND, 503: NOT_PUBLISHED},
)
async def put_top_up_rule(
    tenant_id: TenantIdPath,
    rule_id: RuleIdPath,
    body: TopUpRuleBody,
    sessions: Sessions,
    publisher: Publisher,
    settings: Settings,
    clock: Clock,
) -> TopUpRuleView:
    """Set (or replace) an auto top-up rule: TopUpRuleSet on ledger.events."""
    rules = await folded_rules(sessions, tenant_id)
    if any(rule.rule_id == rule_id for rule in rules.alert_rules()):
        raise AdminError(409, "rule_id", f"{rule_id!r} is an alert rule; remove it first")
    event = await _publish_set(
        TopUpRuleSet, "top-up-rule-set", tenant_id, rule_id, body, publisher, settings, clock
    )
    return top_up_rule_view(event)


@router.delete(
    "/tenants/{tenant_id}/top-up-rules/{rule_id}", response_model=RuleRemoved, responses={503: NOT_PUBLISHED}
)
async def delete_top_up_rule(
    tenant_id: TenantIdPath,
    rule_id: RuleIdPath,
    sessions: Sessions,
    publisher: Publisher,
    settings: Settings,
    clock: Clock,
) -> RuleRemoved:
    """Remove an auto top-up rule (TopUpRuleRemoved); removing one that is not there changes nothing."""
    await folded_rules(sessions, tenant_id)  # the tenant exists
    return await _publish_removed(
        TopUpRuleRemoved, "top-up-rule-removed", tenant_id, rule_id, publisher, settings, clock
    )


@router.get("/tenants/{tenant_id}/top-up-rules", response_model=list[TopUpRuleView])
async def list_top_up_rules(tenant_id: TenantIdPath, sessions: Sessions) -> list[TopUpRuleView]:
    """The tenant's auto top-up rules as folded from its archived rule events, in the order first set."""
    return [top_up_rule_view(rule) for rule in (await folded_rules(sessions, tenant_id)).top_up_rules()]


async def _publish_set(event_type, name: str, tenant_id: str, rule_id: str, body, publisher, settings, clock):
    """The rule's set event (validated as the fold decodes it: a 422 naming the field), published."""
    now_ms = clock()
    event = _checked(
        lambda: event_type(
            event_id=rule_event_id(name, tenant_id, rule_id, now_ms, body),
            tenant_id=tenant_id,
            rule_id=rule_id,
            set_at=now_ms,
            **body.model_dump(),
        )
    )
    await commands.accepted(publisher.publish(event), event.event_id, settings.publish_timeout_ms)
    return event


async def _publish_removed(
    event_type, name: str, tenant_id: str, rule_id: str, publisher, settings, clock
) -> RuleRemoved:
    now_ms = clock()
    event = event_type(
        event_id=rule_event_id(name, tenant_id, rule_id, now_ms),
        tenant_id=tenant_id,
        rule_id=rule_id,
        removed_at=now_ms,
    )
    await commands.accepted(publisher.publish(event), event.event_id, settings.publish_timeout_ms)
    return RuleRemoved(tenant_id=tenant_id, rule_id=rule_id, event_id=event.event_id, removed_at=now_ms)


# ------------------------------------------------------------------------------------------ helpers


async def folded_rules(sessions, tenant_id: str) -> TenantRules:
    """The tenant's rules folded from its archived rule events in log order; a 404 for no such tenant."""
    async with sessions() as session:
        await commands.existing_tenant(session, tenant_id)
        payloads = await session.scalars(
            select(LedgerEvent.payload)
            .where(LedgerEvent.tenant_id == tenant_id, LedgerEvent.event_type.in_(RULE_EVENT_TAGS))
            .order_by(LedgerEvent.source_partition, LedgerEvent.source_offset)
        )
        events: list[RuleEvent] = [_rule_event(payload) for payload in payloads]
    return rules_of(tenant_id, events)


def rule_event_id(
    action: str, tenant_id: str, rule_id: str, now_ms: int, body: BaseModel | None = None
) -> str:
    """Unique per tenant, rule, millisecond and body (ledger_events is unique on event ids across tenants):
    two different changes in one millisecond are two events; the same one sent twice is one."""
    content = body.model_dump_json() if body is not None else ""
    digest = hashlib.sha256(f"{tenant_id}\x00{rule_id}\x00{now_ms}\x00{content}".encode()).hexdigest()[:32]
    return f"{action}-{digest}"


def alert_rule_view(rule: AlertRuleSet) -> AlertRuleView:
    return AlertRuleView(
        tenant_id=rule.tenant_id,
        rule_id=rule.rule_id,
        event_id=rule.event_id,
        set_at=rule.set_at,
        kind=rule.kind,
        threshold=rule.threshold,
        window_ms=rule.window_ms,
    )


def top_up_rule_view(rule: TopUpRuleSet) -> TopUpRuleView:
    return TopUpRuleView(
        tenant_id=rule.tenant_id,
        rule_id=rule.rule_id,
        event_id=rule.event_id,
        set_at=rule.set_at,
        threshold=rule.threshold,
        amount=rule.amount,
        target=rule.target,
        category=rule.category,
        price=rule.price,
        currency=rule.currency,
        monthly_count_max=rule.monthly_count_max,
        monthly_price_max=rule.monthly_price_max,
    )


def _checked(build):
    """The event, validated as the fold will decode it; a 422 naming the field otherwise."""
    try:
        return validated(build())
    except InvalidEvent as error:
        field, _, message = error.reason.partition(":")
        if field == "invalid event":  # a constraint msgspec checked on decode: its message names the path
            field = "body"
        raise AdminError(422, field, message.strip()) from None


def _rule_event(payload: dict) -> RuleEvent:
    event = decode_event(msgspec.json.encode(payload))
    assert isinstance(event, (AlertRuleSet, AlertRuleRemoved, TopUpRuleSet, TopUpRuleRemoved)), event
    return event
