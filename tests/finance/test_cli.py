"""The finance commands of the CLI: what they send to the admin API (a mock transport answering with a
real statement), the CSV they print, and `tollgate export` against a real Postgres."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import duckdb
import httpx
import pytest
from typer.testing import CliRunner

from ledger.events import CreditGranted, UsageRecorded
from ledger.statement import encode_statement, statement_lines, statement_of_entries
from ledger.tenant import TenantLedger
from tests.finance.test_statement_api import archive_entries, random_history
from tests.finance.test_statements import DEC, NOV
from tollgate import cli, finance_cli

runner = CliRunner()
JAN_1970_END = 31 * 86_400_000
TOKENS = ("prompt_tokens", "completion_tokens", "cached_prompt_tokens")


def mock_admin(monkeypatch, answer) -> list[httpx.Request]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(request)

    @contextlib.contextmanager
    def admin(url, admin_token):
        with httpx.Client(transport=httpx.MockTransport(handler), base_url="http://admin.test") as client:
            yield client

    monkeypatch.setattr(finance_cli, "_admin", admin)
    monkeypatch.setattr(cli, "_admin", admin)
    return seen


def test_statements_for_a_month_ask_for_its_bounds_and_print_the_lines_as_csv(monkeypatch):
    entries = random_history("acme", 3, scale=2_592_000)  # 1,000 steps of 43.2 min: January 1970, a close
    statement = statement_of_entries("acme", entries, 0, JAN_1970_END)
    assert statement.consumption and statement.adjustments
    seen = mock_admin(monkeypatch, lambda request: httpx.Response(200, content=encode_statement(statement)))
    result = runner.invoke(cli.app, ["statements", "acme", "--period", "1970-01", "--format", "csv"])
    assert result.exit_code == 0, result.output
    (request,) = seen
    assert request.url.path == "/admin/v1/tenants/acme/statements"
    assert dict(request.url.params) == {"from": "0", "to": str(JAN_1970_END)}
    assert finance_cli.period_bounds("2026-11") == (NOV, DEC)
    assert finance_cli.period_bounds("2026-12")[1] == 1_798_761_600_000
    rows = list(csv.reader(io.StringIO(result.output)))
    assert rows[0] == [
        "section", "key", "credits", "currency", "money", "prompt_tokens", "completion_tokens",
        "cached_prompt_tokens",
    ]  # fmt: skip
    expected = [
        ["" if value is None else str(value) for value in line] for line in statement_lines(statement)
    ]
    assert rows[1:] == expected


def test_periods_close_and_paid_grants_send_what_the_api_takes(monkeypatch):
    seen = mock_admin(monkeypatch, lambda request: httpx.Response(200, json={}))
    result = runner.invoke(cli.app, ["periods", "close", "--until", "2026-12-01T00:00:00Z"])
    assert result.exit_code == 0, result.output
    assert json.loads(seen[-1].content) == {"until": DEC}
    grant = ["credits", "grant", "acme", "1000", "--category", "paid", "--price", "5000", "--currency", "USD"]
    result = runner.invoke(cli.app, [*grant, "--reference", "INV-1"])
    assert result.exit_code == 0, result.output
    body = json.loads(seen[-1].content)
    assert {k: body[k] for k in ("category", "price", "currency", "reference")} == {
        "category": "paid",
        "price": 5000,
        "currency": "USD",
        "reference": "INV-1",
    }
    result = runner.invoke(cli.app, ["tenants", "overage-rate", "acme", "250000", "--currency", "EUR"])
    assert result.exit_code == 0, result.output
    assert (seen[-1].method, seen[-1].url.path) == ("PUT", "/admin/v1/tenants/acme/overage-rate")
    assert json.loads(seen[-1].content) == {"rate_per_million_credits": 250000, "currency": "EUR"}


def test_a_period_that_is_not_a_month_is_refused():
    result = runner.invoke(cli.app, ["statements", "acme", "--period", "November"])
    assert result.exit_code == 1 and "YYYY-MM" in result.output


@pytest.mark.postgres
async def test_tollgate_export_writes_parquet_from_database_url(
    session_factory, database_url, tmp_path, monkeypatch
):
    import asyncio

    await archive_entries(session_factory, random_history("acme", 5))
    monkeypatch.setenv("DATABASE_URL", database_url)
    out = tmp_path / "revenue.parquet"
    args = ["export", "revenue", "--from", "0", "--to", "1970-01-01T00:00:01Z", "--out", str(out)]
    result = await asyncio.to_thread(runner.invoke, cli.app, args)
    assert result.exit_code == 0, result.output
    (rows,) = duckdb.connect().execute(f"SELECT count(*) FROM '{out}'").fetchone()
    assert result.output.strip() == f"{rows} rows -> {out}" and rows > 0


@pytest.mark.postgres
async def test_a_usage_with_cached_tokens_shows_them_in_its_models_consumption_line(
    client, tenant_id, session_factory, monkeypatch
):
    """Through Postgres and the admin API (JSON), then the CLI's CSV of that same answer."""
    ledger = TenantLedger(tenant_id)
    entries = ledger.apply(
        CreditGranted(
            event_id="g-event", tenant_id=tenant_id, grant_id="g", amount=1_000, effective_at=0,
            category="paid", price=10_000, currency="USD",
        )
    )  # fmt: skip
    for event_id, model, prompt, completion, cached in (
        ("u1", "tiny", 120, 30, 80),
        ("u2", "tiny", 40, 10, 25),
        ("u3", "large", 10, 5, 0),
    ):
        entries += ledger.apply(
            UsageRecorded(
                event_id=event_id, tenant_id=tenant_id, amount=10, occurred_at=5, model=model,
                prompt_tokens=prompt, completion_tokens=completion, cached_prompt_tokens=cached,
            )
        )  # fmt: skip
    await archive_entries(session_factory, entries)
    response = await client.get(
        f"/admin/v1/tenants/{tenant_id}/statements", params={"from": 0, "to": JAN_1970_END}
    )
    assert response.status_code == 200, response.text
    consumption = {line["key"]: line for line in response.json()["consumption"]}
    tokens = {key: tuple(line[name] for name in TOKENS) for key, line in consumption.items()}
    assert tokens == {"tiny": (160, 40, 105), "large": (10, 5, 0)}

    mock_admin(monkeypatch, lambda request: httpx.Response(200, content=response.content))
    result = runner.invoke(cli.app, ["statements", tenant_id, "--period", "1970-01", "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    lines = {row["key"]: row for row in rows if row["section"] == "consumption" and row["credits"]}
    tokens = {key: tuple(row[name] for name in TOKENS) for key, row in lines.items()}
    assert tokens == {"tiny": ("160", "40", "105"), "large": ("10", "5", "0")}
    assert all(row["cached_prompt_tokens"] == "" for row in rows if row["section"] != "consumption")


def test_statements_as_known_at_ask_for_the_books_as_they_stood_then(monkeypatch):
    statement = statement_of_entries("acme", [], NOV, DEC)
    seen = mock_admin(monkeypatch, lambda request: httpx.Response(200, content=encode_statement(statement)))
    result = runner.invoke(
        cli.app, ["statements", "acme", "--period", "2026-11", "--as-known-at", "2026-11-02T00:00:00Z"]
    )
    assert result.exit_code == 0, result.output
    (request,) = seen
    known = str(NOV + 86_400_000)
    assert dict(request.url.params) == {"from": str(NOV), "to": str(DEC), "as_known_at": known}
    assert json.loads(result.output)["period_start"] == NOV
