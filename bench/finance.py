"""bench.finance: a statement over a month with 1M usage entries, and the Parquet export of those entries.

One tenant, a paid grant and 1M usage events in November 2026 across four models, folded by the real
ledger (TenantLedger); the entries and their movements are written to an embedded Postgres with COPY, the
way the projector's rows look (storage.finance.movement_values). Then:

- statement_ms: GET-statement's work (storage.finance.tenant_statement: SQL sums + assembly), best and
  median of several runs; target <= 500 ms.
- export_rows_per_s: `tollgate export entries` to Parquet (COPY -> pyarrow -> Parquet), the median of
  three runs after VACUUM ANALYZE (the first read of freshly COPYed rows also sets their hint bits,
  rewriting every page: a cost of loading the benchmark, not of exporting); target >= 200k.

Prints one JSON line. BENCH_FINANCE_USAGE overrides the 1M (for a quick run).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import msgspec
import psycopg

from ledger.entries import encode_entry
from ledger.events import CreditGranted, UsageRecorded
from ledger.statement import movements
from ledger.tenant import TenantLedger
from storage.database import (
    DatabaseSettings,
    build_async_engine,
    build_session_factory,
    libpq_url,
    start_embedded_postgres,
    upgrade_database,
)
from storage.finance import (
    DAY_MS,
    GROUPED,
    SUMMED,
    entry_finance_columns,
    movement_values,
    tenant_statement,
)
from tollgate.finance_export import export

USAGE_EVENTS = int(os.environ.get("BENCH_FINANCE_USAGE", 1_000_000))
STATEMENT_RUNS = 7
EXPORT_RUNS = 3
STATEMENT_TARGET_MS = 500
EXPORT_TARGET_ROWS_PER_S = 200_000
NOV = 1_793_491_200_000  # 2026-11-01T00:00:00Z
DEC = 1_796_083_200_000
TENANT = "bench-finance"
MODELS = ("tiny", "small", "medium", "large")
MOVEMENT_COLUMNS = (
    "entry_id", "row", "tenant_id", "booked_at_ms", "own_time_ms", "section", "adjustment", "model",
    "grant_id", "credits", "money", "overage", "prompt_tokens", "completion_tokens", "cause_event_id",
)  # fmt: skip


ENTRY_COLUMNS = (
    "entry_id", "tenant_id", "entry_type", "occurred_at_ms", "amount", "payload", "source_topic",
    "source_partition", "source_offset", "recorded_at_ms", "booked_at_ms", "credits", "money", "model",
    "adjustment",
)  # fmt: skip
DAYS_SQL = f"""
INSERT INTO ledger_movement_days (tenant_id, day, {", ".join(GROUPED)}, {", ".join(SUMMED)})
SELECT tenant_id, booked_at_ms / {DAY_MS}, {", ".join(GROUPED)}, {", ".join(f"sum({c})" for c in SUMMED)}
FROM ledger_movements GROUP BY tenant_id, booked_at_ms / {DAY_MS}, {", ".join(GROUPED)}
"""
GRANT_COLUMNS = ("grant_id", "tenant_id", "category", "price", "currency", "reference", "terms")


def folded_entries() -> list:
    ledger = TenantLedger(TENANT)
    entries = ledger.apply(
        CreditGranted(
            event_id="grant",
            tenant_id=TENANT,
            grant_id="g-paid",
            amount=USAGE_EVENTS * 100,
            effective_at=NOV,
            category="paid",
            price=USAGE_EVENTS * 37,
            currency="USD",
            reference="INV-BENCH",
        )
    )
    step = (DEC - NOV) // USAGE_EVENTS
    for n in range(USAGE_EVENTS):
        entries += ledger.apply(
            UsageRecorded(
                event_id=f"u{n}",
                tenant_id=TENANT,
                amount=50 + n % 100,
                occurred_at=NOV + n * step,
                model=MODELS[n % 4],
                prompt_tokens=100,
                completion_tokens=20,
            )
        )
    return entries


def _copy(url: str, table: str, columns: tuple[str, ...], rows) -> None:
    statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
    connection = psycopg.connect(libpq_url(url))
    with connection, connection.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


def load(url: str, entries: list) -> None:
    """The projector's rows (storage.finance's helpers), written with COPY; the days summed in SQL."""
    entry_movements = [movement_values(TENANT, movements(e)) for e in entries]
    entry_rows = (
        (e.entry_id, e.tenant_id, type(e).__struct_config__.tag, getattr(e, "occurred_at", None),
         getattr(e, "amount", None), encode_entry(e).decode(), "ledger.entries", 0, offset, 0,
         *entry_finance_columns(rows).values())
        for offset, (e, rows) in enumerate(zip(entries, entry_movements, strict=True))
    )  # fmt: skip
    _copy(url, "ledger_entries", ENTRY_COLUMNS, entry_rows)
    movement_rows = (tuple(row[c] for c in MOVEMENT_COLUMNS) for rows in entry_movements for row in rows)
    _copy(url, "ledger_movements", MOVEMENT_COLUMNS, movement_rows)
    with psycopg.connect(libpq_url(url), autocommit=True) as connection:
        connection.execute(DAYS_SQL)
    grant = entries[0]
    terms = (grant.grant_id, TENANT, grant.category, grant.price, grant.currency, grant.reference)
    _copy(url, "grant_terms", GRANT_COLUMNS, [(*terms, msgspec.json.encode(grant).decode())])
    with psycopg.connect(libpq_url(url), autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")  # settled pages, as rows written minutes before an export are


async def statement_times(url: str) -> tuple[list[float], object]:
    engine = build_async_engine(url, DatabaseSettings())
    sessions = build_session_factory(engine)
    times, statement = [], None
    try:
        for _ in range(STATEMENT_RUNS):
            started = time.perf_counter()
            async with sessions() as session, session.begin():
                statement = await tenant_statement(session, TENANT, NOV, DEC)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        await engine.dispose()
    return times, statement


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-finance-") as scratch:
        url = start_embedded_postgres(Path(scratch) / "pgdata", delete_on_exit=True)
        upgrade_database(url)
        started = time.process_time()
        entries = folded_entries()
        fold_s = time.process_time() - started
        load(url, entries)
        times, statement = asyncio.run(statement_times(url))
        consumed = sum(line.credits for line in statement.consumption)
        assert consumed == sum(e.amount for e in entries[1:]), "the statement lost usage"
        out = Path(scratch) / "entries.parquet"
        export_times = []
        for _ in range(EXPORT_RUNS):
            started = time.perf_counter()
            rows = export("entries", url, NOV, DEC, "parquet", out)
            export_times.append(time.perf_counter() - started)
            assert rows == len(entries), f"exported {rows} of {len(entries)}"
    export_s = statistics.median(export_times)
    best, median = min(times), statistics.median(times)
    print(
        json.dumps(
            {
                "bench": "finance",
                "usage_entries": USAGE_EVENTS,
                "fold_us_per_usage": round(fold_s / USAGE_EVENTS * 1e6, 2),
                "statement_ms_best": round(best, 1),
                "statement_ms_median": round(median, 1),
                "statement_target_ms": STATEMENT_TARGET_MS,
                "statement_met": median <= STATEMENT_TARGET_MS,
                "export_rows": rows,
                "export_s": [round(t, 2) for t in export_times],
                "export_rows_per_s_best": round(rows / min(export_times)),
                "export_rows_per_s": round(rows / export_s),  # the median run
                "export_target_rows_per_s": EXPORT_TARGET_ROWS_PER_S,
                "export_met": rows / export_s >= EXPORT_TARGET_ROWS_PER_S,
                "load_1m": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )


if __name__ == "__main__":
    main()
