"""The webhook commands of `tollgate` (over the admin API), and the dispatcher process.

tollgate webhooks create TENANT https://... [--description ...] [--kind depleted ...]
tollgate webhooks list TENANT
tollgate webhooks delete ENDPOINT            (disables it; its delivery log stays)
tollgate webhooks rotate-secret ENDPOINT [--overlap 24h]   the old secret signs too until the overlap ends
tollgate webhooks deliveries ENDPOINT [--since N] [--limit N]
tollgate webhooks dispatch                   the dispatcher over Kafka (python -m streams.webhooks)
"""

from __future__ import annotations

import re
from typing import Annotated

import typer

from tollgate.cli import AdminToken, Url, _admin, _show, app
from tollgate.operating_errors import operating_errors

webhooks_app = typer.Typer(
    help="Webhook endpoints for alerts, and their delivery logs.", no_args_is_help=True
)
app.add_typer(webhooks_app, name="webhooks")

DURATION_UNITS_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)?")


def duration_ms(text: str) -> int:
    """The milliseconds of "90s", "30m", "24h", "7d", "1500ms" or a bare number (milliseconds)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise typer.BadParameter(f"{text!r}: a duration such as 0, 90s, 30m, 24h or 7d")
    return int(match[1]) * DURATION_UNITS_MS[match[2] or "ms"]


@webhooks_app.command("create")
def webhooks_create(
    tenant_id: str,
    endpoint_url: Annotated[str, typer.Argument(help="Where to POST the alerts (http:// or https://).")],
    description: Annotated[str, typer.Option(help="A note for operators.")] = "",
    kind: Annotated[
        list[str] | None,
        typer.Option(help="An alert kind to deliver (repeat for more); default every kind."),
    ] = None,
    url: Url = None,
    admin_token: AdminToken = None,
) -> None:
    """Register an endpoint for a tenant's alerts. Its signing secret (whsec_...) is shown once."""
    body: dict = {"url": endpoint_url, "description": description}
    if kind:
        body["alert_kinds"] = kind
    with _admin(url, admin_token) as client:
        _show(client.post(f"/admin/v1/tenants/{tenant_id}/webhooks", json=body))


@webhooks_app.command("list")
def webhooks_list(tenant_id: str, url: Url = None, admin_token: AdminToken = None) -> None:
    """A tenant's endpoints (never their secrets)."""
    with _admin(url, admin_token) as client:
        _show(client.get(f"/admin/v1/tenants/{tenant_id}/webhooks"))


@webhooks_app.command("delete")
def webhooks_delete(endpoint_id: str, url: Url = None, admin_token: AdminToken = None) -> None:
    """Disable an endpoint: nothing more is sent to it; its delivery log stays readable."""
    with _admin(url, admin_token) as client:
        _show(client.delete(f"/admin/v1/webhooks/{endpoint_id}"))


@webhooks_app.command("rotate-secret")
def webhooks_rotate(
    endpoint_id: str,
    overlap: Annotated[
        int | None,
        typer.Option(
            parser=duration_ms,
            metavar="DURATION",
            help="How long the old secret keeps signing beside the new one: 0 (it stops at once), 90s, 30m, "
            "24h, 7d, 1500ms; default the admin API's (TOLLGATE_ADMIN_WEBHOOK_SECRET_OVERLAP_MS).",
        ),
    ] = None,
    url: Url = None,
    admin_token: AdminToken = None,
) -> None:
    """A new signing secret, shown once; the old one keeps signing beside it until the overlap ends."""
    body = {"overlap_ms": overlap} if overlap is not None else None
    with _admin(url, admin_token) as client:
        _show(client.post(f"/admin/v1/webhooks/{endpoint_id}/rotate-secret", json=body))


@webhooks_app.command("deliveries")
def webhooks_deliveries(
    endpoint_id: str,
    since: Annotated[int, typer.Option(help="The last `sequence` already read.")] = 0,
    limit: Annotated[int, typer.Option(help="Attempts per page (at most 500).")] = 100,
    url: Url = None,
    admin_token: AdminToken = None,
) -> None:
    """An endpoint's delivery log: every attempt, its HTTP status or error, latency, next retry and state."""
    with _admin(url, admin_token) as client:
        _show(
            client.get(
                f"/admin/v1/webhooks/{endpoint_id}/deliveries", params={"since": since, "limit": limit}
            )
        )


@webhooks_app.command("dispatch")
def webhooks_dispatch() -> None:
    """Run the webhook dispatcher over Kafka (TOLLGATE_WEBHOOK_* settings), until Ctrl-C or SIGTERM."""
    from streams.webhooks.dispatcher import main as dispatcher_main

    with operating_errors("webhooks dispatch"):
        dispatcher_main()
