"""`tollgate audit verify` over Postgres and the log (the embedded Postgres log here; the Kafka run is in
test_audit_kafka.py): an untouched ledger passes; each tampering is caught and named (tenant, sequence,
field): an amount changed, a row deleted, two rows swapped, a checkpoint edited, a tampered copy of the
topic."""

from __future__ import annotations

import msgspec
import pytest

from ledger.chain import GENESIS_HASH, entry_hash, split_record
from storage.database import build_async_engine, build_session_factory
from streams.audit_verify import verify
from streams.embedded_log import PostgresLog
from streams.topics import LedgerTopics
from tests.audit.helpers import KEY, ledger_events, write_ledger
from tests.streams.helpers import stream_settings

PUBLIC = KEY.public_key()


@pytest.fixture
async def ledger(database_url, database_settings, topic_prefix, tmp_path):
    engine = build_async_engine(database_url, database_settings)
    log = PostgresLog(engine, stream_settings("unused:9092", topic_prefix, tmp_path))
    await log.start()
    session_factory = build_session_factory(engine)
    await write_ledger(log, session_factory, ledger_events())
    yield log, session_factory, engine
    await log.stop()
    await engine.dispose()


async def execute(engine, statement: str) -> None:
    """As a tamperer with the database's owner rights: the append-only triggers switched off."""
    async with engine.begin() as connection:
        await connection.exec_driver_sql("SET LOCAL session_replication_role = replica")
        await connection.exec_driver_sql(statement)


async def first_divergence(log, session_factory, tenants=None):
    report = await verify(log, session_factory, PUBLIC, tenants)
    assert not report.ok, "the tampering was not caught"
    return report.divergences[0]


async def test_an_untouched_ledger_passes_and_every_entry_and_checkpoint_is_checked(ledger):
    log, session_factory, _ = ledger
    report = await verify(log, session_factory, PUBLIC)
    assert report.ok, [str(d) for d in report.divergences]
    assert report.tenants == 2 and report.entries > 60 and report.checkpoints >= 15


async def test_a_changed_amount_is_named(ledger):
    log, session_factory, engine = ledger
    await execute(
        engine,
        "UPDATE ledger_entries SET amount = amount + 1 WHERE tenant_id = 'acme' AND chain_sequence = 5",
    )
    divergence = await first_divergence(log, session_factory)
    assert (divergence.tenant_id, divergence.sequence, divergence.field, divergence.where) == (
        "acme",
        5,
        "amount",
        "postgres",
    )


async def test_a_changed_amount_in_the_stored_bytes_breaks_the_hash(ledger):
    log, session_factory, engine = ledger
    await execute(
        engine,
        "UPDATE ledger_entries SET record = convert_to(regexp_replace(convert_from(record, 'UTF8'),"
        " '\"amount\":([0-9]+)', '\"amount\":9\\1'), 'UTF8')"
        " WHERE tenant_id = 'globex' AND chain_sequence = 7",
    )
    divergence = await first_divergence(log, session_factory, {"globex"})
    assert (divergence.tenant_id, divergence.sequence, divergence.field) == ("globex", 7, "hash")


async def test_a_deleted_row_is_named(ledger):
    log, session_factory, engine = ledger
    await execute(engine, "DELETE FROM ledger_entries WHERE tenant_id = 'acme' AND chain_sequence = 9")
    divergence = await first_divergence(log, session_factory)
    assert (divergence.tenant_id, divergence.sequence, divergence.field) == ("acme", 9, "missing")


async def test_two_swapped_rows_are_named(ledger):
    log, session_factory, engine = ledger
    swap = """
        WITH a AS (SELECT * FROM ledger_entries WHERE tenant_id = 'acme' AND chain_sequence = 3),
             b AS (SELECT * FROM ledger_entries WHERE tenant_id = 'acme' AND chain_sequence = 4)
        UPDATE ledger_entries e SET entry_id = o.entry_id || '#', entry_type = o.entry_type,
            amount = o.amount, payload = o.payload, chain_sequence = -o.chain_sequence,
            chain_hash = o.chain_hash, record = o.record
        FROM (SELECT a.sequence AS target, b.* FROM a, b
              UNION ALL SELECT b.sequence AS target, a.* FROM a, b) o
        WHERE e.sequence = o.target"""
    await execute(engine, swap)
    await execute(
        engine,
        "UPDATE ledger_entries SET chain_sequence = -chain_sequence, entry_id = rtrim(entry_id, '#')"
        " WHERE tenant_id = 'acme' AND chain_sequence < 0",
    )
    divergence = await first_divergence(log, session_factory)
    assert (divergence.tenant_id, divergence.sequence, divergence.field) == ("acme", 3, "order")


async def test_an_edited_checkpoint_is_named(ledger):
    log, session_factory, engine = ledger
    await execute(
        engine,
        "UPDATE ledger_checkpoints SET merkle_root = repeat('0', 64)"
        " WHERE tenant_id = 'globex' AND number = 2",
    )
    divergence = await first_divergence(log, session_factory)
    assert (divergence.tenant_id, divergence.sequence, divergence.field) == (
        "globex",
        2,
        "checkpoint merkle_root",
    )
    await execute(
        engine,
        "UPDATE ledger_checkpoints SET merkle_root = head_hash,"
        " record = convert_to(replace(convert_from(record, 'UTF8'), merkle_root, head_hash), 'UTF8')"
        " WHERE tenant_id = 'acme' AND number = 3",
    )
    divergence = await first_divergence(log, session_factory, {"acme"})
    assert (divergence.tenant_id, divergence.sequence, divergence.field) == (
        "acme",
        3,
        "checkpoint signature",
    )


async def copy_with(log: PostgresLog, engine, tmp_path, prefix: str, change) -> PostgresLog:
    """A copy of the entries and checkpoints topics under another prefix, one entry changed by `change`;
    the copy's view reads the original ledger.events."""
    settings = stream_settings("unused:9092", prefix, tmp_path)
    copy = PostgresLog(engine, settings)
    await copy.start()
    for source, target in (
        (log.topics.entries, copy.topics.entries),
        (log.topics.checkpoints, copy.topics.checkpoints),
    ):
        for partition in range(log.partitions):
            records = await log.read(source, partition, 0, 100_000)
            values = (
                change([r.value for r in records])
                if source == log.topics.entries
                else [r.value for r in records]
            )
            for record, value in zip(records, values, strict=True):
                await copy.append(target, record.key, value)
    copy.topics = LedgerTopics(
        events=log.topics.events,
        entries=copy.topics.entries,
        balances=copy.topics.balances,
        dlq=copy.topics.dlq,
        checkpoints=copy.topics.checkpoints,
    )
    return copy


def _acme_sixth(values: list[bytes]) -> int | None:
    found = (
        i for i, v in enumerate(values) if b'"tenant_id":"acme"' in v and split_record(v)[1].sequence == 6
    )
    return next(found, None)


async def test_a_tampered_copy_of_the_topic_is_caught(ledger, topic_prefix, tmp_path):
    log, session_factory, engine = ledger

    def naive(values):
        index = _acme_sixth(values)
        if index is None:  # another partition's entries
            return values
        values[index] = values[index].replace(b'"overage":0', b'"overage":1', 1)
        return values

    copy = await copy_with(log, engine, tmp_path, topic_prefix + "copy1.", naive)
    divergence = await first_divergence(copy, session_factory)
    assert (divergence.tenant_id, divergence.sequence, divergence.field, divergence.where) == (
        "acme",
        6,
        "hash",
        "topic",
    )

    def rechained(values):
        """A careful forger: the amount changed and every later link of the tenant hashed again."""
        index = _acme_sixth(values)
        if index is None:
            return values
        previous = GENESIS_HASH
        for position, value in enumerate(values):
            if b'"tenant_id":"acme"' not in value:
                continue
            body, link = split_record(value)
            if position == index:
                decoded = msgspec.json.decode(body)
                decoded["amount"] += 1
                decoded["overage"] += 1
                body = msgspec.json.encode(decoded)
            own = entry_hash(previous, link.sequence, link.position, body)
            chain = {**msgspec.structs.asdict(link), "previous": previous.hex(), "hash": own.hex()}
            values[position] = body[:-1] + b',"chain":' + msgspec.json.encode(chain) + b"}"
            previous = own
        return values

    copy = await copy_with(log, engine, tmp_path, topic_prefix + "copy2.", rechained)
    divergence = await first_divergence(copy, session_factory)
    assert divergence.tenant_id == "acme" and divergence.where == "checkpoints (topic)"
    assert divergence.field == "checkpoint merkle_root"
