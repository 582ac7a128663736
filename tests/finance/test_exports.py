"""`tollgate export` on a real Postgres, read back with DuckDB: typed columns (BIGINT money, UTC
timestamps, dates) and the same totals as the admin API's statements."""

from __future__ import annotations

import asyncio

import duckdb
import pytest

from tests.finance.test_statement_api import archive_entries, random_history
from tollgate.finance_export import export

pytestmark = pytest.mark.postgres

START, END = 0, 800


async def api_statement(client, tenant_id: str) -> dict:
    response = await client.get(
        f"/admin/v1/tenants/{tenant_id}/statements", params={"from": START, "to": END}
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("seed", range(3))
async def test_parquet_exports_read_back_with_duckdb_give_the_apis_totals(
    client, tenant_id, session_factory, database_url, tmp_path, seed
):
    other = (await client.post("/admin/v1/tenants", json={"name": "Other", "tier": "pro"})).json()[
        "tenant_id"
    ]
    await archive_entries(
        session_factory, random_history(tenant_id, seed) + random_history(other, seed + 100)
    )
    paths = {kind: tmp_path / f"{kind}.parquet" for kind in ("entries", "revenue", "statements")}
    for kind, path in paths.items():
        assert await asyncio.to_thread(export, kind, database_url, START, END, "parquet", path) > 0
    db = duckdb.connect()
    types = {row[0]: row[1] for row in db.execute(f"DESCRIBE SELECT * FROM '{paths['entries']}'").fetchall()}
    assert types["booked_at"] == "TIMESTAMP WITH TIME ZONE" and types["money"] == "BIGINT"
    for tenant in (tenant_id, other):
        statement = await api_statement(client, tenant)
        change = statement["closing"]["credits"] - statement["opening"]["credits"]
        (credits,) = db.execute(
            f"SELECT coalesce(sum(credits), 0) FROM '{paths['entries']}' WHERE tenant_id = ?", [tenant]
        ).fetchone()
        assert credits == change
        revenue = dict(
            db.execute(
                f"SELECT currency, sum(revenue) FROM '{paths['revenue']}' "
                "WHERE tenant_id = ? AND NOT adjustment AND currency IS NOT NULL GROUP BY currency",
                [tenant],
            ).fetchall()
        )
        api_revenue: dict[str, int] = {}
        for line in statement["consumption"]:
            for currency, amount in line["money"]:
                api_revenue[currency] = api_revenue.get(currency, 0) + amount
        assert {c: a for c, a in revenue.items() if a} == {c: a for c, a in api_revenue.items() if a}
        api_cached = {line["key"]: line["cached_prompt_tokens"] for line in statement["consumption"]}
        revenue_cached = db.execute(
            f"SELECT model, sum(cached_prompt_tokens) FROM '{paths['revenue']}' "
            "WHERE tenant_id = ? AND NOT adjustment GROUP BY model",
            [tenant],
        ).fetchall()
        statement_cached = db.execute(
            f"SELECT key, cached_prompt_tokens FROM '{paths['statements']}' "
            "WHERE tenant_id = ? AND section = 'consumption' AND currency IS NULL",
            [tenant],
        ).fetchall()
        nonzero = {model: cached for model, cached in api_cached.items() if cached}
        assert {model: cached for model, cached in revenue_cached if cached} == nonzero
        assert {model: cached for model, cached in statement_cached if cached} == nonzero
        (closing,) = db.execute(
            f"SELECT credits FROM '{paths['statements']}' "
            "WHERE tenant_id = ? AND section = 'closing' AND currency IS NULL",
            [tenant],
        ).fetchone()
        assert closing == statement["closing"]["credits"]
    day_type = db.execute(f"SELECT typeof(day) FROM '{paths['revenue']}' LIMIT 1").fetchone()
    assert day_type in (None, ("DATE",))


async def test_a_csv_export_has_a_header_and_the_same_rows(
    client, tenant_id, session_factory, database_url, tmp_path
):
    await archive_entries(session_factory, random_history(tenant_id, 7))
    rows = export("entries", database_url, START, END, "csv", tmp_path / "entries.csv")
    parquet_rows = export("entries", database_url, START, END, "parquet", tmp_path / "entries.parquet")
    db = duckdb.connect()
    (csv_count,) = db.execute(f"SELECT count(*) FROM read_csv_auto('{tmp_path / 'entries.csv'}')").fetchone()
    assert rows == parquet_rows == csv_count > 0
