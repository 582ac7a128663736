"""The tenant page's alert and auto top-up rules and webhook endpoints, through the admin API's own code
(gateway.admin.rules: the rules folded from the archived rule events, and its PUT and DELETE functions,
which publish the rule events; gateway.admin.webhooks: the endpoints' views). Secrets are never shown."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import select

from gateway.admin import rules, webhooks
from gateway.admin.errors import AdminError
from storage.webhooks import WebhookEndpoint

RULE_ID = re.compile(
    next(m.pattern for m in rules.RuleIdPath.__metadata__[0].metadata if hasattr(m, "pattern"))
)
ALERT_KINDS = rules.AlertRuleBody.model_fields["kind"].annotation.__args__
ENDPOINTS_SHOWN = 50


async def tenant_rules(sessions, tenant_id: str) -> dict[str, list]:
    folded = await rules.folded_rules(sessions, tenant_id)
    return {
        "alert": [rules.alert_rule_view(rule) for rule in folded.alert_rules()],
        "top_up": [rules.top_up_rule_view(rule) for rule in folded.top_up_rules()],
    }


async def tenant_webhooks(session, tenant_id: str) -> list:
    rows = await session.execute(
        select(WebhookEndpoint)
        .where(WebhookEndpoint.tenant_id == tenant_id)
        .order_by(WebhookEndpoint.created_at_ms, WebhookEndpoint.endpoint_id)
        .limit(ENDPOINTS_SHOWN)
    )
    return [webhooks.view(row) for row in rows.scalars()]


def rule_id_of(form: dict[str, str]) -> str:
    rule_id = form.get("rule_id", "")
    if RULE_ID.fullmatch(rule_id) is None:
        raise AdminError(
            422, "rule_id", "letters, digits, '.', '_' or '-', at most 64, starting alphanumeric"
        )
    return rule_id


def numbers(form: dict[str, str], names: tuple[str, ...]) -> dict[str, Any]:
    """The form's non-empty fields among `names`, digits as integers (the models check the rest)."""
    picked: dict[str, Any] = {name: form[name] for name in names if form.get(name)}
    for name, value in picked.items():
        if isinstance(value, str) and value.isdigit():
            picked[name] = int(value)
    return picked


ALERT_FIELDS = ("kind", "threshold", "window_ms")
TOP_UP_FIELDS = (
    "threshold",
    "amount",
    "target",
    "category",
    "price",
    "currency",
    "monthly_count_max",
    "monthly_price_max",
)
