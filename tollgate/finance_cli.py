"""The finance commands of `tollgate`: statements, period close, overage rate (over the admin API) and
exports (straight from the database: bulk reads).

    tollgate statements TENANT --period 2026-11 [--format json|csv]
    tollgate periods close --until 2026-12-01T00:00:00Z
    tollgate tenants overage-rate TENANT RATE --currency USD     (minor units per million credits)
    tollgate export entries|statements|revenue --from --to --format parquet|csv --out PATH
"""

from __future__ import annotations

import csv
import sys
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from tollgate.cli import AdminToken, Url, _admin, _fail, _show, app, tenants_app
from tollgate.operating_errors import operating_errors

periods_app = typer.Typer(help="Accounting periods (admin API).", no_args_is_help=True)
app.add_typer(periods_app, name="periods")


class StatementFormat(StrEnum):
    json = "json"
    csv = "csv"


class ExportKind(StrEnum):
    entries = "entries"
    statements = "statements"
    revenue = "revenue"


class ExportFormat(StrEnum):
    parquet = "parquet"
    csv = "csv"


def period_bounds(period: str) -> tuple[int, int]:
    """'2026-11' -> [2026-11-01T00:00:00Z, 2026-12-01T00:00:00Z) in epoch ms."""
    try:
        start = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC)
    except ValueError:
        _fail(f"--period {period!r}: expected YYYY-MM")
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def time_ms(value: str) -> int:
    """Epoch ms or ISO 8601 (a bare date or a time without a zone is UTC)."""
    if value.isdigit():
        return int(value)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        _fail(f"{value!r}: expected epoch ms or ISO 8601")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


@app.command()
def statements(
    tenant_id: str,
    period: Annotated[str, typer.Option(help="The month, YYYY-MM (UTC).")],
    format: Annotated[StatementFormat, typer.Option("--format", help="json or csv.")] = StatementFormat.json,
    as_known_at: Annotated[
        str | None,
        typer.Option(help="The books as they stood then (knowledge time): ISO 8601 or epoch ms."),
    ] = None,
    url: Url = None,
    admin_token: AdminToken = None,
) -> None:
    """A tenant's statement for a month: balances, grants, consumption by model, expiries, voids, overage
    and adjustments to closed periods, in credits and money; with --as-known-at, as known then."""
    import msgspec

    from ledger.statement import Statement, StatementLine, statement_lines

    start, end = period_bounds(period)
    params = {"from": start, "to": end}
    if as_known_at is not None:
        params["as_known_at"] = time_ms(as_known_at)
    with _admin(url, admin_token) as client:
        response = client.get(f"/admin/v1/tenants/{tenant_id}/statements", params=params)
        if format == StatementFormat.json or response.status_code >= 400:
            _show(response)
            return
    statement = msgspec.json.decode(response.content, type=Statement)
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(StatementLine._fields)
    for line in statement_lines(statement):
        writer.writerow(["" if value is None else value for value in line])


@periods_app.command("close")
def periods_close(
    until: Annotated[str, typer.Option(help="Close everything before this time: ISO 8601 or epoch ms.")],
    url: Url = None,
    admin_token: AdminToken = None,
) -> None:
    """Close the books before --until for every tenant (PeriodClosed on ledger.events)."""
    with _admin(url, admin_token) as client:
        _show(client.post("/admin/v1/periods/close", json={"until": time_ms(until)}))


@tenants_app.command("overage-rate")
def tenants_overage_rate(
    tenant_id: str,
    rate: Annotated[
        int | None, typer.Argument(help="Minor units per million credits; omit to unset.")
    ] = None,
    currency: Annotated[str | None, typer.Option(help="ISO 4217.")] = None,
    url: Url = None,
    admin_token: AdminToken = None,
) -> None:
    """Price the tenant's overage on statements (without a rate it is reported, not priced)."""
    body = {"rate_per_million_credits": rate, "currency": currency}
    with _admin(url, admin_token) as client:
        _show(client.put(f"/admin/v1/tenants/{tenant_id}/overage-rate", json=body))


@app.command()
def export(
    kind: Annotated[ExportKind, typer.Argument(help="entries, statements or revenue.")],
    start: Annotated[str, typer.Option("--from", help="Window start (booked time): ISO 8601 or epoch ms.")],
    end: Annotated[str, typer.Option("--to", help="Window end, exclusive.")],
    out: Annotated[Path, typer.Option(help="The file to write.")],
    format: Annotated[ExportFormat, typer.Option("--format", help="parquet or csv.")] = ExportFormat.parquet,
) -> None:
    """Export the books (DATABASE_URL, or the embedded database) as typed Parquet or CSV."""
    from storage.database import DatabaseSettings, resolve_database_url
    from tollgate.finance_export import export as write_export

    with operating_errors("export"):
        url = resolve_database_url(DatabaseSettings())
        rows = write_export(kind.value, url, time_ms(start), time_ms(end), format.value, out)
    typer.echo(f"{rows} rows -> {out}")
