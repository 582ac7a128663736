"""`tollgate export entries|statements|revenue`: the books as Parquet or CSV, with pyarrow.

Typed columns: integers (int64) for credits and money, timestamps in UTC (timestamp[ms, tz=UTC]), days
as date32. entries: one row per entry booked in the window; revenue: one row per tenant, day, model,
currency and adjustment flag; statements: every tenant's statement of the window in long form
(ledger.statement.statement_lines). Entries and revenue are read with COPY ... TO STDOUT and parsed by
pyarrow (storage.finance), so rows never become Python objects.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ledger.statement import statement_lines
from storage.database import DatabaseSettings, build_async_engine, build_session_factory, libpq_url
from storage.finance import (
    ENTRIES_EXPORT_SQL,
    REVENUE_EXPORT_SQL,
    export_sql,
    tenant_statement,
    tenants_with_movements,
)

UTC_MS = pa.timestamp("ms", tz="UTC")
ENTRIES_COLUMNS = {
    "sequence": pa.int64(),
    "entry_id": pa.string(),
    "tenant_id": pa.string(),
    "entry_type": pa.string(),
    "occurred_at_ms": pa.int64(),
    "booked_at_ms": pa.int64(),
    "amount": pa.int64(),
    "credits": pa.int64(),  # change to the prepaid balance
    "money": pa.int64(),  # change to deferred money, minor units
    "model": pa.string(),
    "adjustment": pa.bool_(),
}
REVENUE_COLUMNS = {
    "tenant_id": pa.string(),
    "day": pa.int32(),
    "model": pa.string(),
    "currency": pa.string(),
    "adjustment": pa.bool_(),
    "credits": pa.int64(),
    "revenue": pa.int64(),
    "overage": pa.int64(),
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "cached_prompt_tokens": pa.int64(),  # of prompt_tokens, those served from a prefix cache
}
TIMESTAMP_COLUMNS = {"occurred_at_ms": "occurred_at", "booked_at_ms": "booked_at"}
KINDS = ("entries", "statements", "revenue")
FORMATS = ("parquet", "csv")


def _copied(url: str, sql: str, columns: dict[str, pa.DataType]) -> pa.Table:
    chunks = []
    connection = psycopg.connect(libpq_url(url))
    with connection, connection.cursor() as cursor, cursor.copy(sql) as copy:
        chunks.extend(copy)
    return pacsv.read_csv(
        pa.BufferReader(b"".join(chunks)),
        convert_options=pacsv.ConvertOptions(
            column_types=columns, strings_can_be_null=True, true_values=["t"], false_values=["f"]
        ),
    )


def entries_table(url: str, start: int, end: int) -> pa.Table:
    table = _copied(url, export_sql(ENTRIES_EXPORT_SQL, start, end), ENTRIES_COLUMNS).sort_by("sequence")
    for column, name in TIMESTAMP_COLUMNS.items():
        index = table.schema.get_field_index(column)
        table = table.set_column(index, name, pc.cast(table[column], UTC_MS))
    return table


def revenue_table(url: str, start: int, end: int) -> pa.Table:
    table = _copied(url, export_sql(REVENUE_EXPORT_SQL, start, end), REVENUE_COLUMNS)
    return table.set_column(table.schema.get_field_index("day"), "day", pc.cast(table["day"], pa.date32()))


def statements_table(url: str, start: int, end: int, settings: DatabaseSettings | None = None) -> pa.Table:
    async def lines() -> list[dict]:
        engine = build_async_engine(url, settings or DatabaseSettings())
        try:
            sessions = build_session_factory(engine)
            rows = []
            async with sessions() as session, session.begin():
                for tenant_id in await tenants_with_movements(session, start, end):
                    statement = await tenant_statement(session, tenant_id, start, end)
                    rows += [
                        {"tenant_id": tenant_id, **line._asdict()} for line in statement_lines(statement)
                    ]
            return rows
        finally:
            await engine.dispose()

    rows = asyncio.run(lines())
    schema = pa.schema(
        [
            ("tenant_id", pa.string()),
            ("period_start", UTC_MS),
            ("period_end", UTC_MS),
            ("section", pa.string()),
            ("key", pa.string()),
            ("credits", pa.int64()),
            ("currency", pa.string()),
            ("money", pa.int64()),
            ("prompt_tokens", pa.int64()),  # consumption lines' credits rows only
            ("completion_tokens", pa.int64()),
            ("cached_prompt_tokens", pa.int64()),
        ]
    )
    return pa.Table.from_pylist([{**row, "period_start": start, "period_end": end} for row in rows], schema)


def export(kind: str, url: str, start: int, end: int, fmt: str, out: Path) -> int:
    """Write the export; returns its row count."""
    assert kind in KINDS and fmt in FORMATS, f"export {kind} as {fmt}"
    table = {"entries": entries_table, "revenue": revenue_table, "statements": statements_table}[kind](
        url, start, end
    )
    if fmt == "parquet":
        pq.write_table(table, out)
    else:
        pacsv.write_csv(table, out)
    return table.num_rows
