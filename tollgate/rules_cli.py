"""The alert and auto top-up rule commands of `tollgate` (over the admin API), and the top-up agent.

tollgate alerts set TENANT RULE --kind balance_below --threshold 1000
tollgate alerts set TENANT RULE --kind grant_expiring --window-ms 86400000
tollgate alerts remove TENANT RULE
tollgate alerts list TENANT
tollgate top-up set TENANT RULE --threshold 1000 (--amount 5000 | --target 10000) --price 500 --currency USD
                    [--category paid|promotional] [--monthly-count-max 3] [--monthly-price-max 2000]
tollgate top-up remove TENANT RULE
tollgate top-up list TENANT
tollgate top-up agent                        the auto top-up agent over Kafka (python -m tollgate.topup_agent)
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from tollgate.cli import AdminToken, Url, _admin, _show, app
from tollgate.operating_errors import operating_errors

alerts_app = typer.Typer(
    help="Alert rules: balance below, percent, depleted, grant expiring.", no_args_is_help=True
)
top_up_app = typer.Typer(help="Auto top-up rules, and the agent that grants them.", no_args_is_help=True)
app.add_typer(alerts_app, name="alerts")
app.add_typer(top_up_app, name="top-up")


class AlertKind(StrEnum):
    balance_below = "balance_below"
    balance_below_percent = "balance_below_percent"
    depleted = "depleted"
    grant_expiring = "grant_expiring"


class Category(StrEnum):
    paid = "paid"
    promotional = "promotional"


def _without_none(body: dict) -> dict:
    return {name: value for name, value in body.items() if value is not None}


@alerts_app.command("set")
def alerts_set(
    tenant_id: str,
    rule_id: str,
    kind: Annotated[AlertKind, typer.Option(help="What the rule watches.")],
    threshold: Annotated[
        int | None, typer.Option(help="Credits (balance_below) or a percent (balance_below_percent).")
    ] = None,
    window_ms: Annotated[int | None, typer.Option(help="grant_expiring: how long before the expiry.")] = None,
    url: Url = None,
    admin_token: AdminToken = None,
) -> None:
    """Set (or replace) an alert rule; its alerts go to ledger.alerts (and the tenant's webhooks)."""
    body = _without_none({"kind": kind.value, "threshold": threshold, "window_ms": window_ms})
    with _admin(url, admin_token) as client:
        _show(client.put(f"/admin/v1/tenants/{tenant_id}/alert-rules/{rule_id}", json=body))


@alerts_app.command("remove")
def alerts_remove(tenant_id: str, rule_id: str, url: Url = None, admin_token: AdminToken = None) -> None:
    """Remove an alert rule."""
    with _admin(url, admin_token) as client:
        _show(client.delete(f"/admin/v1/tenants/{tenant_id}/alert-rules/{rule_id}"))


@alerts_app.command("list")
def alerts_list(tenant_id: str, url: Url = None, admin_token: AdminToken = None) -> None:
    """A tenant's alert rules, as folded from the log."""
    with _admin(url, admin_token) as client:
        _show(client.get(f"/admin/v1/tenants/{tenant_id}/alert-rules"))


@top_up_app.command("set")
def top_up_set(
    tenant_id: str,
    rule_id: str,
    threshold: Annotated[int, typer.Option(help="Top up when the settled balance falls below this.")],
    amount: Annotated[int | None, typer.Option(help="Grant this many credits ...")] = None,
    target: Annotated[int | None, typer.Option(help="... or enough to reach this balance.")] = None,
    category: Annotated[Category, typer.Option(help="The grant's category.")] = Category.paid,
    price: Annotated[
        int | None, typer.Option(help="Minor units: of --amount, or of --target credits (prorated).")
    ] = None,
    currency: Annotated[str | None, typer.Option(help="ISO 4217, e.g. USD.")] = None,
    monthly_count_max: Annotated[int | None, typer.Option(help="At most this many top-ups a month.")] = None,
    monthly_price_max: Annotated[int | None, typer.Option(help="At most this much money a month.")] = None,
    url: Url = None,
    admin_token: AdminToken = None,
) -> None:
    """Set (or replace) an auto top-up rule (a monthly cap is required: count, money or both)."""
    body = _without_none(
        {
            "threshold": threshold,
            "amount": amount,
            "target": target,
            "category": category.value,
            "price": price,
            "currency": currency,
            "monthly_count_max": monthly_count_max,
            "monthly_price_max": monthly_price_max,
        }
    )
    with _admin(url, admin_token) as client:
        _show(client.put(f"/admin/v1/tenants/{tenant_id}/top-up-rules/{rule_id}", json=body))


@top_up_app.command("remove")
def top_up_remove(tenant_id: str, rule_id: str, url: Url = None, admin_token: AdminToken = None) -> None:
    """Remove an auto top-up rule."""
    with _admin(url, admin_token) as client:
        _show(client.delete(f"/admin/v1/tenants/{tenant_id}/top-up-rules/{rule_id}"))


@top_up_app.command("list")
def top_up_list(tenant_id: str, url: Url = None, admin_token: AdminToken = None) -> None:
    """A tenant's auto top-up rules, as folded from the log."""
    with _admin(url, admin_token) as client:
        _show(client.get(f"/admin/v1/tenants/{tenant_id}/top-up-rules"))


@top_up_app.command("agent")
def top_up_agent() -> None:
    """Run the auto top-up agent: grants the top-ups on ledger.alerts (distributed deployment)."""
    from tollgate import topup_agent

    with operating_errors():
        topup_agent.main()
