"""Audit benchmark: `python -m bench.audit` prints one JSON line.

- `verify_entries_per_s`: the CPU work of `tollgate audit verify` per entry, in process (no broker, no
  database): one tenant's usage events are folded by the real `LedgerProcessor` in batches (entries
  chained, checkpoints signed every `TOLLGATE_AUDIT_CHECKPOINT_ENTRIES_MAX`), then `streams.audit_verify`
  checks every link and Merkle root and signature (`check_links`, `check_checkpoints`) and re-folds the
  source records to compare every entry byte for byte (`refold`), as the command does per tenant. Reading
  Postgres and the topics comes on top.
- `point_in_time_p50_ms` / `point_in_time_p99_ms`: a balance at a random event time T as known at a random
  knowledge time K through the admin API's query (`gateway.admin.queries.balance_at`) over Postgres (an
  embedded server in a temporary directory): one tenant's `--point-in-time-events` usage events (1M by
  default) are archived as the projector archives them (`streams.projector.rows_of_batch`, written with
  COPY; knowledge time = a record's log time, some usage arriving late), the snapshots are built by the real
  writer (`streams.snapshotter.snapshot_tenant`, every `TOLLGATE_AUDIT_SNAPSHOT_EVERY_EVENTS`; its rate is
  `snapshot_events_per_s`), then `--queries` random (T, K); a few answers are checked against the full fold
  of the events known by K. Target: p99 <= 50 ms at 1M events.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import tempfile
import time
from pathlib import Path

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.streams import grant_records, throughput_records
from gateway.admin.queries import balance_at
from gateway.admin.settings import AdminSettings
from ledger.codec import decode_input_event
from ledger.tenant import TenantLedger
from storage.database import (
    DatabaseSettings,
    build_async_engine,
    build_session_factory,
    libpq_url,
    start_embedded_postgres,
    upgrade_database,
)
from streams.audit_checkpoints import AuditSettings, CheckpointPolicy, key_id
from streams.audit_verify import EntryRow, check_checkpoints, check_links, refold
from streams.processor import LedgerProcessor
from streams.projector import rows_of_batch
from streams.records import LogRecord
from streams.settings import StreamSettings
from streams.snapshotter import snapshot_tenant
from streams.topics import LedgerTopics

TOPIC = "ledger.events"
TENANT = "bench-tenant-0"
BATCH_MAX = 2_000
VERIFY_EVENTS_DEFAULT = 100_000
POINT_EVENTS_DEFAULT = 1_000_000
QUERIES_DEFAULT = 300
CHECKED_QUERIES = 3  # answers compared with the full fold of the events known by K
LATE_EVERY = 20  # every 20th usage is known this long after its event time
LATE_BY_MS = 50_000
ARCHIVE_CHUNK = 50_000
EVENT_COLUMNS = (
    "event_id", "tenant_id", "event_type", "occurred_at_ms", "payload", "source_topic", "source_partition",
    "source_offset", "recorded_at_ms", "known_at_ms",
)  # fmt: skip
POINT_TARGET_P99_MS = 50
START_MS = 1_700_000_000_000


class _NoState(dict):
    def items_with_prefix(self, prefix: bytes):
        return iter(())


def source_records(events: int) -> list[LogRecord]:
    values = grant_records([TENANT]) + throughput_records([TENANT], events, START_MS)
    return [
        LogRecord(TOPIC, 0, offset, key, value, START_MS + offset)
        for offset, (key, value) in enumerate(values)
    ]


def verify_rate(events: int) -> dict:
    key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"bench.audit").digest())
    policy = CheckpointPolicy(1_000, 60_000, key, key_id(key.public_key()))
    records = source_records(events)
    processor = LedgerProcessor(_NoState(), source_topic=TOPIC, outbox=False, checkpoints=policy)
    entries, checkpoints = [], []
    for start in range(0, len(records), BATCH_MAX):
        output = processor.process(0, records[start : start + BATCH_MAX])
        entries += [EntryRow(record.value) for record in output.entries]
        checkpoints += [(record.value, None) for record in output.checkpoints]
    started = time.process_time()
    hashes, divergence = check_links(TENANT, entries, "bench")
    assert divergence is None, divergence
    assert check_checkpoints(TENANT, checkpoints, hashes, key.public_key(), "bench") is None
    links_s = time.process_time() - started
    assert refold(TENANT, records, entries, TOPIC) is None
    total_s = time.process_time() - started
    return {
        "verify_entries": len(entries),
        "verify_checkpoints": len(checkpoints),
        "verify_entries_per_s": round(len(entries) / total_s),
        "verify_links_and_roots_entries_per_s": round(len(entries) / links_s),
    }


def archived_records(events: int) -> list[LogRecord]:
    """The tenant's records with their log times: in order, a few per millisecond, every LATE_EVERY-th
    usage arriving LATE_BY_MS after its event time (its knowledge time is later than later usage's)."""
    records = source_records(events)
    return [
        record._replace(timestamp_ms=record.timestamp_ms + (LATE_BY_MS if n % LATE_EVERY == 7 else 0))
        for n, record in enumerate(records)
    ]


def archive(url: str, records: list[LogRecord]) -> None:
    """The projector's ledger_events rows (`rows_of_batch`), written with COPY."""
    topics = LedgerTopics.from_settings(StreamSettings(topic_prefix=""))  # the records' TOPIC
    connection = psycopg.connect(libpq_url(url))
    statement = f"COPY ledger_events ({', '.join(EVENT_COLUMNS)}) FROM STDIN"
    with connection, connection.cursor() as cursor, cursor.copy(statement) as copy:
        for start in range(0, len(records), ARCHIVE_CHUNK):
            rows = rows_of_batch(topics, records[start : start + ARCHIVE_CHUNK], START_MS)
            for row in rows.events.values():
                copy.write_row([json.dumps(row[c]) if c == "payload" else row[c] for c in EVENT_COLUMNS])
    with psycopg.connect(libpq_url(url), autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE ledger_events")


async def build_snapshots(url: str, every_events: int) -> tuple[int, float]:
    engine = build_async_engine(url, DatabaseSettings())
    try:
        started = time.perf_counter()
        written = await snapshot_tenant(build_session_factory(engine), TENANT, every_events, START_MS)
        return written, time.perf_counter() - started
    finally:
        await engine.dispose()


async def query_times(url: str, records: list[LogRecord], queries: int, rng: random.Random) -> list[float]:
    events_max = AdminSettings.model_fields["balance_events_max"].default
    engine = build_async_engine(url, DatabaseSettings())
    sessions = build_session_factory(engine)
    end = max(record.timestamp_ms for record in records)
    latencies = []
    try:
        for n in range(queries):
            at, known = rng.randrange(START_MS, end), rng.randrange(START_MS, end)
            started = time.perf_counter()
            async with sessions() as session:
                view = await balance_at(session, TENANT, at, events_max, known)
            latencies.append((time.perf_counter() - started) * 1000)
            if n < CHECKED_QUERIES:
                ledger = TenantLedger(TENANT)
                for record in records:
                    if record.timestamp_ms <= known:
                        ledger.apply(decode_input_event(record.value))
                expected = (ledger.balance_at(at), ledger.overage_at(at))
                assert (view.balance, view.overage) == expected, (at, known, view, expected)
    finally:
        await engine.dispose()
    return latencies


def point_in_time(events: int, queries: int, rng: random.Random) -> dict:
    every_events = AuditSettings().snapshot_every_events
    records = archived_records(events)
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as scratch:
        url = start_embedded_postgres(Path(scratch) / "pgdata", delete_on_exit=True)
        upgrade_database(url)
        archive(url, records)
        written, snapshot_s = asyncio.run(build_snapshots(url, every_events))
        latencies = asyncio.run(query_times(url, records, queries, rng))
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return {
        "point_in_time_events": events,
        "point_in_time_queries": queries,
        "snapshot_every_events": every_events,
        "snapshots": written,
        "snapshot_events_per_s": round(len(records) / snapshot_s),
        "point_in_time_p50_ms": round(latencies[len(latencies) // 2], 1),
        "point_in_time_p99_ms": round(p99, 1),
        "point_in_time_target_p99_ms": POINT_TARGET_P99_MS,
        "point_in_time_target_met": p99 <= POINT_TARGET_P99_MS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verify-events", type=int, default=VERIFY_EVENTS_DEFAULT)
    parser.add_argument("--point-in-time-events", type=int, default=POINT_EVENTS_DEFAULT)
    parser.add_argument("--queries", type=int, default=QUERIES_DEFAULT)
    arguments = parser.parse_args()
    result = {"benchmark": "audit", **verify_rate(arguments.verify_events)}
    result.update(point_in_time(arguments.point_in_time_events, arguments.queries, random.Random(7)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
