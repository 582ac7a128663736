"""The `tollgate` command line (Typer). Every command has --help.

    tollgate dev                      the whole system in one process (what `make run` calls)
    tollgate gateway | worker | streams | projector | migrate | topics
                                      one component each, for the distributed deployment
    tollgate ledger replay            audit replay of ledger.events (--verify against live balances)
    tollgate audit public-key | verify  the entries' hash chain and signed checkpoints (tollgate.audit_cli)
    tollgate tenants create | keys create | credits grant | balance
    tollgate statements | periods close | tenants overage-rate | export   finance (tollgate.finance_cli)
                                      the admin API, over HTTP: the gateway URL from --url, TOLLGATE_URL,
                                      .tollgate/demo.json, else http://127.0.0.1:8000; the admin token
                                      from --admin-token, TOLLGATE_ADMIN_TOKEN or .tollgate/demo.json

An operating error (gateway, broker or database unreachable, a port or spool in use) is one line on
stderr naming the cause and the setting to change, and exit status 1 (tollgate.operating_errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from tollgate.common_settings import default_tiers
from tollgate.operating_errors import operating_errors

app = typer.Typer(help="Tollgate: event-sourced billing and metering for AI inference.", no_args_is_help=True)
ledger_app = typer.Typer(help="Audit the ledger.", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants (admin API).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (admin API).", no_args_is_help=True)
credits_app = typer.Typer(help="Credit grants (admin API).", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(credits_app, name="credits")
models_app = typer.Typer(help="Model aliases: canary, promotion, rollback (admin API).", no_args_is_help=True)
app.add_typer(models_app, name="models")

DATA_DIR = Path(".tollgate")
DEMO_FILE = DATA_DIR / "demo.json"
ADMIN_TIMEOUT_S = 30.0
DEFAULT_GATEWAY_URL = "http://127.0.0.1:8000"
GATEWAY_URL_ENV = "TOLLGATE_URL"
ADMIN_TOKEN_ENV = "TOLLGATE_ADMIN_TOKEN"

Url = Annotated[
    str | None,
    typer.Option(
        envvar=GATEWAY_URL_ENV,
        help=f"Gateway base URL (default: .tollgate/demo.json, else {DEFAULT_GATEWAY_URL}).",
    ),
]
AdminToken = Annotated[
    str | None, typer.Option(envvar=ADMIN_TOKEN_ENV, help="Admin token (default: from .tollgate/demo.json).")
]

TIER_NAMES = ", ".join(default_tiers())  # the shared tiers (tollgate.common_settings), for help


# ------------------------------------------------------------------------------------------- processes


@app.command()
def dev(
    host: Annotated[str, typer.Option(help="Gateway address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Gateway port.")] = 8000,
    worker_port: Annotated[int, typer.Option(help="The inference worker's internal port.")] = 8100,
    data_dir: Annotated[
        Path, typer.Option(help="Where the embedded database and demo.json live.")
    ] = DATA_DIR,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show every component's and library's log lines.")
    ] = False,
) -> None:
    """Run everything in one process on embedded defaults: Postgres (pgserver), the event log, the stream
    processor, the projector, one inference worker and the gateway. Ctrl-C stops it all."""
    from tollgate.dev import DevOptions, run_dev

    with operating_errors("dev"):
        run_dev(DevOptions(host=host, port=port, worker_port=worker_port, data_dir=data_dir, verbose=verbose))


@app.command()
def gateway() -> None:
    """Run the gateway (settings from TOLLGATE_* environment variables)."""
    from gateway.__main__ import main as gateway_main

    with operating_errors("gateway"):
        gateway_main()


@app.command()
def worker() -> None:
    """Run one inference worker (TOLLGATE_WORKER_* settings; usage events go to Kafka)."""
    from inference.worker import main as worker_main

    with operating_errors("worker"):
        worker_main()


class StreamsEngine(StrEnum):
    batch = "batch"
    faust = "faust"


@app.command()
def streams(
    engine: Annotated[
        StreamsEngine,
        typer.Option(
            help="batch: plain aiokafka, a batch at a time (fast); faust: the faust-streaming agent."
        ),
    ] = StreamsEngine.batch,
) -> None:
    """Run one ledger stream processor (scale out by running more with the same app id and engine)."""
    if engine is StreamsEngine.faust:
        from streams.faust_app import run_processor
    else:
        from streams.batch_processor import run_processor

    with operating_errors("streams"):
        run_processor()


@app.command()
def projector() -> None:
    """Run the Postgres projector (Kafka topics into tables, exactly once)."""
    from streams.projector import main as projector_main

    with operating_errors("projector"):
        projector_main()


@app.command()
def migrate() -> None:
    """Wait for the database (DATABASE_URL, or the embedded one) and migrate it to the latest schema."""
    from storage.database import DatabaseSettings, prepare_database

    with operating_errors("migrate"):
        url = prepare_database(DatabaseSettings())
    typer.echo(f"database at head: {url.split('@')[-1]}")


@app.command()
def topics() -> None:
    """Create the ledger topics that are missing (partitions, retention and compaction as declared)."""
    from streams.settings import StreamSettings
    from streams.topics import ensure_topics, ledger_topic_specs

    settings = StreamSettings()
    with operating_errors("topics"):
        created = asyncio.run(ensure_topics(settings.kafka_bootstrap_servers, ledger_topic_specs(settings)))
    typer.echo(f"created: {', '.join(created) or 'none (all exist)'}")


# ---------------------------------------------------------------------------------------------- audit


@ledger_app.command("replay")
def ledger_replay(
    until_offset: Annotated[
        int | None, typer.Option(help="Stop after this offset in every partition.")
    ] = None,
    until_time: Annotated[
        int | None, typer.Option(help="Only records stamped at or before this epoch ms.")
    ] = None,
    verify: Annotated[
        bool, typer.Option(help="Compare with the live ledger.balances; exit 1 on any mismatch.")
    ] = False,
    as_known_at: Annotated[
        int | None,
        typer.Option(help="Replay to this knowledge time (epoch ms): the events the log accepted by then."),
    ] = None,
) -> None:
    """Rebuild every tenant from ledger.events with the pure fold and print their balances."""
    if as_known_at is not None:  # a record's timestamp is when the log accepted it (README "Audit")
        until_time = as_known_at if until_time is None else min(until_time, as_known_at)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from streams.replay import compare, live_balances, replay
    from streams.settings import StreamSettings

    settings = StreamSettings()
    console = Console()
    with Progress(
        TextColumn("replaying ledger.events"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("replay", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        result = asyncio.run(
            replay(settings, until_offset=until_offset, until_time_ms=until_time, on_progress=on_progress)
        )
    table = Table("tenant", "balance", "overage", "as of (epoch ms)")
    for balance in result.balances(at=until_time):
        table.add_row(balance.tenant_id, str(balance.balance), str(balance.overage), str(balance.as_of))
    console.print(table)
    console.print(f"{result.records} records, {result.dead_letters} rejected (see ledger.dlq)")
    if verify:
        mismatches = compare(result, asyncio.run(live_balances(settings)))
        for mismatch in mismatches:
            console.print(f"[red]MISMATCH[/red] {mismatch.tenant_id}: {mismatch.reason}")
        if mismatches:
            raise typer.Exit(1)
        console.print("[green]verified[/green]: every live balance equals the replay")


# ---------------------------------------------------------------------------------------- admin API


def admin_target(url: str | None, admin_token: str | None) -> tuple[str, str | None]:
    """(gateway base URL, admin token): the options (which Typer fills from TOLLGATE_URL and
    TOLLGATE_ADMIN_TOKEN), else .tollgate/demo.json, else the local default URL."""
    demo = json.loads(DEMO_FILE.read_text()) if DEMO_FILE.exists() else {}
    base_url = url or demo.get("base_url", DEFAULT_GATEWAY_URL).removesuffix("/v1")
    return base_url.rstrip("/"), admin_token or demo.get("admin_token")


@contextlib.contextmanager
def _admin(url: str | None, admin_token: str | None) -> Iterator:
    """An admin API client; a gateway that cannot be reached is one line naming its URL and the setting."""
    import httpx

    base_url, token = admin_target(url, admin_token)
    if not token:
        _fail(
            f"no admin token: pass --admin-token or set {ADMIN_TOKEN_ENV} "
            f"(`tollgate dev` writes it to {DEMO_FILE})"
        )
    client = httpx.Client(
        base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=ADMIN_TIMEOUT_S
    )
    try:
        with client:
            yield client
    except httpx.TransportError as error:
        _fail(
            f"cannot reach the gateway at {base_url} ({type(error).__name__}: {error}): "
            "start it (tollgate dev), "
            f"or point the CLI at it with {GATEWAY_URL_ENV} or --url"
        )


def _fail(line: str) -> NoReturn:
    typer.echo(f"tollgate: {line}", err=True)
    raise typer.Exit(1)


def _show(response) -> None:
    try:
        body = response.json()
    except ValueError:
        body = response.text
    typer.echo(json.dumps(body, indent=2))
    if response.status_code >= 400:
        raise typer.Exit(1)


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Option(help="Display name.")],
    tier: Annotated[
        str, typer.Option(help=f"Tenant tier: one of TOLLGATE_TIERS ({TIER_NAMES} by default).")
    ] = "free",
    url: Url = None,
    admin_token: AdminToken = None,
) -> None:
    """Create a tenant."""
    with _admin(url, admin_token) as client:
        _show(client.post("/admin/v1/tenants", json={"name": name, "tier": tier}))


DailyCredits = Annotated[
    int | None, typer.Option(help="Spend limit in credits per UTC day; default none.")
]
MonthlyCredits = Annotated[
    int | None, typer.Option(help="Spend limit in credits per UTC calendar month; default none.")
]


@keys_app.command("create")
def keys_create(
    tenant_id: str,
    daily_credits: DailyCredits = None,
    monthly_credits: MonthlyCredits = None,
    url: Url = None,
    admin_token: AdminToken = None,
) -> None:
    """Issue an API key for a tenant (the secret is shown once), optionally with budgets."""
    limits = {"daily_credits": daily_credits, "monthly_credits": monthly_credits}
    body = {name: value for name, value in limits.items() if value is not None}
    with _admin(url, admin_token) as client:
        _show(client.post(f"/admin/v1/tenants/{tenant_id}/keys", json=body or None))


@keys_app.command("budget")
def keys_budget(
    key_id: str,
    daily_credits: DailyCredits = None,
    monthly_credits: MonthlyCredits = None,
    url: Url = None,
    admin_token: AdminToken = None,
) -> None:
    """Replace a key's budgets (an option left out: no limit in that window)."""
    body = {"daily_credits": daily_credits, "monthly_credits": monthly_credits}
    with _admin(url, admin_token) as client:
        _show(client.put(f"/admin/v1/keys/{key_id}/budget", json=body))


@credits_app.command("grant")
def credits_grant(
    tenant_id: str,
    amount: Annotated[int, typer.Argument(help="Credit units (integer).")],
    expires_at: Annotated[str | None, typer.Option(help="ISO 8601 or epoch ms; default never.")] = None,
    effective_at: Annotated[str | None, typer.Option(help="ISO 8601 or epoch ms; default now.")] = None,
    priority: Annotated[int, typer.Option(help="Lower is drawn first.")] = 0,
    idempotency_key: Annotated[str | None, typer.Option(help="Repeat-safe key; default a new one.")] = None,
    category: Annotated[
        str, typer.Option(help="paid (needs --price, --currency) or promotional.")
    ] = "promotional",
    price: Annotated[
        int | None, typer.Option(help="What the credits were bought for, in minor units.")
    ] = None,
    currency: Annotated[str | None, typer.Option(help="ISO 4217, e.g. USD.")] = None,
    reference: Annotated[str, typer.Option(help="An invoice or order id.")] = "",
    model: Annotated[
        list[str] | None,
        typer.Option(help="A model the credit pays for (repeat for several); default any model."),
    ] = None,
    url: Url = None,
    admin_token: AdminToken = None,
) -> None:
    """Grant credits to a tenant (emits CreditGranted)."""
    import uuid

    body: dict = {"amount": amount, "priority": priority, "category": category, "reference": reference}
    if model:
        body["models"] = model
    body.update({"price": price, "currency": currency})
    if expires_at is not None:
        body["expires_at"] = int(expires_at) if expires_at.isdigit() else expires_at
    if effective_at is not None:
        body["effective_at"] = int(effective_at) if effective_at.isdigit() else effective_at
    with _admin(url, admin_token) as client:
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        _show(client.post(f"/admin/v1/tenants/{tenant_id}/grants", json=body, headers=headers))


@app.command()
def balance(
    tenant_id: str,
    at: Annotated[str | None, typer.Option(help="ISO 8601 or epoch ms; default now.")] = None,
    as_known_at: Annotated[
        str | None, typer.Option(help="The ledger as it stood then (knowledge time); default now.")
    ] = None,
    url: Url = None,
    admin_token: AdminToken = None,
) -> None:
    """A tenant's three balances (settled, live: settled minus open holds, pending: grants not yet
    effective), overage and blocks at a point in time (T), as known at another (K)."""
    params = {name: value for name, value in (("at", at), ("as_known_at", as_known_at)) if value}
    with _admin(url, admin_token) as client:
        _show(client.get(f"/admin/v1/tenants/{tenant_id}/balance", params=params or None))


@models_app.command("route")
def models_route(
    alias: str,
    stable: Annotated[str, typer.Option(help="The stable version (a model registry entry).")],
    canary: Annotated[str | None, typer.Option(help="The canary version; none: no rollout.")] = None,
    percent: Annotated[int, typer.Option(help="The canary's share of the alias's traffic, 0-100.")] = 0,
    url: Url = None,
    admin_token: AdminToken = None,
) -> None:
    """Set an alias's stable version and start (or change) a canary rollout."""
    body = {"stable_model": stable, "canary_model": canary, "canary_percent": percent}
    with _admin(url, admin_token) as client:
        _show(client.put(f"/admin/v1/models/{alias}/route", json=body))


@models_app.command("promote")
def models_promote(alias: str, url: Url = None, admin_token: AdminToken = None) -> None:
    """Make an alias's canary its stable version."""
    with _admin(url, admin_token) as client:
        _show(client.post(f"/admin/v1/models/{alias}/promote"))


@models_app.command("rollback")
def models_rollback(
    alias: str,
    reason: Annotated[str, typer.Option(help="Why, kept with the route.")] = "manual",
    url: Url = None,
    admin_token: AdminToken = None,
) -> None:
    """Send no more of an alias's traffic to its canary."""
    with _admin(url, admin_token) as client:
        _show(client.post(f"/admin/v1/models/{alias}/rollback", json={"reason": reason}))


@models_app.command("show")
def models_show(alias: str, url: Url = None, admin_token: AdminToken = None) -> None:
    """An alias's route: stable and canary versions, share, state and why."""
    with _admin(url, admin_token) as client:
        _show(client.get(f"/admin/v1/models/{alias}/route"))


@app.command()
def version() -> None:
    """Print the installed version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("tollgate"))


def main() -> None:
    app()


# The finance commands (statements, periods close, tenants overage-rate, export) and the audit commands
# (audit public-key, audit verify) add themselves to `app`.
import tollgate.audit_cli  # noqa: E402,F401
import tollgate.finance_cli  # noqa: E402,F401
import tollgate.rules_cli  # noqa: E402,F401  (alerts, top-up)
import tollgate.webhooks_cli  # noqa: E402,F401
