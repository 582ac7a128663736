"""The projector's batch write against real Postgres, records handed in directly (no broker here;
tests/storage/test_projector_kafka.py runs it over a real one)."""

import msgspec
import psycopg
import pytest

from ledger.codec import decode_event, encode_event
from ledger.entries import Allocation, UsageAllocated, encode_entry
from ledger.events import CreditExpired, CreditGranted, UsageRecorded
from streams.projector import ProjectorSettings, project_records, stored_offsets
from streams.records import LogRecord
from streams.topics import LedgerTopics
from tests.storage.dead_letters import RecordingDeadLetters

pytestmark = pytest.mark.postgres

TOPICS = LedgerTopics(
    events="ledger.events", entries="ledger.entries", balances="ledger.balances", dlq="ledger.dlq"
)
GRANT = CreditGranted(
    event_id="e1", tenant_id="t1", grant_id="g1", amount=100, effective_at=10, expires_at=20
)
USAGE = UsageRecorded(event_id="r1", tenant_id="t1", amount=5, occurred_at=12, model="m")
EXPIRED = CreditExpired(event_id="t1/expired/g1", tenant_id="t1", grant_id="g1", expired_at=20, amount=95)


def balance_value(tenant_id: str, balance: int, as_of: int) -> bytes:
    return msgspec.json.encode(
        {"tenant_id": tenant_id, "balance": balance, "overage": 0, "as_of": as_of, "applied_offset": as_of}
    )


async def project(session_factory, records) -> RecordingDeadLetters:
    dead_letters = RecordingDeadLetters()
    await project_records(session_factory, "p", TOPICS, records, 1, dead_letters)
    return dead_letters


def rows(database_url: str, query: str) -> list[tuple]:
    with psycopg.connect(database_url) as connection:
        return connection.execute(query).fetchall()


async def test_batches_write_each_event_once_and_advance_offsets(session_factory, database_url):
    first = await project(
        session_factory,
        [
            LogRecord(TOPICS.events, 0, 7, b"t1", encode_event(GRANT)),
            LogRecord(TOPICS.events, 0, 8, b"t1", encode_event(GRANT)),  # a producer retry's duplicate
            LogRecord(TOPICS.events, 1, 3, b"t1", b"{not json"),
            LogRecord(TOPICS.entries, 2, 0, b"t1", encode_entry(EXPIRED)),
        ],
    )
    await project(
        session_factory,
        [
            LogRecord(TOPICS.events, 0, 9, b"t1", encode_event(USAGE)),
            LogRecord(TOPICS.events, 0, 10, b"t1", encode_event(GRANT)),
            LogRecord(TOPICS.entries, 2, 1, b"t1", encode_entry(EXPIRED)),
        ],
    )

    archived = rows(
        database_url,
        "SELECT event_id, event_type, occurred_at_ms, source_offset FROM ledger_events ORDER BY event_id",
    )
    assert archived == [
        ("e1", "credit_granted", 10, 7),
        ("r1", "usage_recorded", 12, 9),
        ("t1/expired/g1", "credit_expired", 20, 0),
    ]
    assert rows(database_url, "SELECT entry_id, entry_type, occurred_at_ms, amount FROM ledger_entries") == [
        ("t1/expired/g1", "credit_expired", 20, 95)
    ]
    (payload,) = rows(database_url, "SELECT payload FROM ledger_events WHERE event_id = 'e1'")[0]
    assert decode_event(msgspec.json.encode(payload)) == GRANT
    async with session_factory() as session:
        assert await stored_offsets(session, "p") == {
            (TOPICS.events, 0): 11,
            (TOPICS.events, 1): 4,  # the undecodable record is dead-lettered, not retried forever
            (TOPICS.entries, 2): 2,
        }
        assert await stored_offsets(session, "another-projector") == {}
    [letter] = first.letters
    assert (letter.source_topic, letter.partition, letter.offset, letter.value) == (
        TOPICS.events,
        1,
        3,
        b"{not json",
    )
    assert letter.reason.startswith("undecodable: ") and first.records[0].topic == TOPICS.dlq


async def test_balances_keep_the_latest_record_and_a_tombstone_deletes(session_factory, database_url):
    await project(
        session_factory,
        [
            LogRecord(TOPICS.balances, 0, 0, b"t1", balance_value("t1", 100, 1)),
            LogRecord(TOPICS.balances, 0, 1, b"t2", balance_value("t2", 7, 1)),
            LogRecord(TOPICS.balances, 0, 2, b"t1", balance_value("t1", 60, 2)),
        ],
    )
    assert rows(database_url, "SELECT tenant_id, balance, as_of_ms FROM balances ORDER BY tenant_id") == [
        ("t1", 60, 2),
        ("t2", 7, 1),
    ]

    await project(
        session_factory,
        [
            LogRecord(TOPICS.balances, 0, 3, b"t1", balance_value("t1", 40, 3)),
            LogRecord(TOPICS.balances, 0, 4, b"t2", None),
            LogRecord(TOPICS.balances, 0, 5, b"\xff", None),  # a key that is not UTF-8: skipped
            LogRecord(TOPICS.balances, 0, 6, b"t1", b'{"tenant_id": "t1"}'),  # fields missing: skipped
        ],
    )
    assert rows(database_url, "SELECT tenant_id, balance, as_of_ms FROM balances") == [("t1", 40, 3)]
    async with session_factory() as session:
        assert await stored_offsets(session, "p") == {(TOPICS.balances, 0): 7}


async def test_a_balance_beyond_bigint_is_dead_lettered_and_the_next_record_projected(
    session_factory, database_url
):
    dead_letters = await project(
        session_factory,
        [
            LogRecord(TOPICS.balances, 0, 0, b"t1", balance_value("t1", 100, 1)),
            LogRecord(TOPICS.balances, 0, 1, b"t2", balance_value("t2", 2**63, 1)),  # Postgres: out of range
            LogRecord(TOPICS.events, 0, 0, b"t1", encode_event(GRANT)),
            LogRecord(TOPICS.balances, 0, 2, b"t1", balance_value("t1", 60, 2)),
        ],
    )
    next_batch = await project(
        session_factory, [LogRecord(TOPICS.balances, 0, 3, b"t3", balance_value("t3", 5, 3))]
    )

    assert rows(database_url, "SELECT tenant_id, balance FROM balances ORDER BY tenant_id") == [
        ("t1", 60),
        ("t3", 5),
    ]
    assert rows(database_url, "SELECT event_id FROM ledger_events") == [("e1",)]
    [letter] = dead_letters.letters
    assert (letter.source_topic, letter.partition, letter.offset, letter.key) == (
        TOPICS.balances,
        0,
        1,
        b"t2",
    )
    assert letter.value == balance_value("t2", 2**63, 1) and "refused by Postgres" in letter.reason
    assert next_batch.records == []
    async with session_factory() as session:
        assert await stored_offsets(session, "p") == {(TOPICS.balances, 0): 4, (TOPICS.events, 0): 1}


async def test_an_event_postgres_cannot_store_is_dead_lettered(session_factory, database_url):
    nul_model = UsageRecorded(event_id="r2", tenant_id="t1", amount=5, occurred_at=12, model="m\x00")
    dead_letters = await project(
        session_factory,
        [
            LogRecord(TOPICS.events, 0, 0, b"t1", encode_event(nul_model)),  # jsonb refuses \u0000
            LogRecord(TOPICS.events, 0, 1, b"t1", encode_event(USAGE)),
        ],
    )

    assert rows(database_url, "SELECT event_id FROM ledger_events") == [("r1",)]
    assert [(letter.offset, letter.source_topic) for letter in dead_letters.letters] == [(0, TOPICS.events)]


async def test_an_entry_whose_money_does_not_add_up_is_dead_lettered_and_the_next_projected(
    session_factory, database_url
):
    def usage_entry(event_id: str, amount: int, allocated: int, overage: int) -> bytes:
        entry = UsageAllocated(
            entry_id=f"t1/usage/{event_id}", tenant_id="t1", event_id=event_id, occurred_at=12, model="m",
            prompt_tokens=1, completion_tokens=1, amount=amount,
            allocations=(Allocation("g1", allocated),), overage=overage,
        )
        return encode_entry(entry)

    dead_letters = await project(
        session_factory,
        [
            LogRecord(TOPICS.entries, 0, 0, b"t1", usage_entry("forged", amount=5, allocated=500, overage=0)),
            LogRecord(TOPICS.entries, 0, 1, b"t1", usage_entry("r1", amount=5, allocated=4, overage=1)),
        ],
    )

    assert rows(database_url, "SELECT entry_id FROM ledger_entries") == [("t1/usage/r1",)]
    [letter] = dead_letters.letters
    assert (letter.offset, letter.source_topic) == (0, TOPICS.entries)
    assert "does not add up" in letter.reason


async def test_the_largest_batch_of_entries_is_written_in_statements_under_the_parameter_limit(
    session_factory, database_url
):
    """`batch_records_max` allows 5,000 records; 5,000 ledger_entries rows of a score of columns each would
    exceed PostgreSQL's 65,535 bind parameters in one INSERT."""
    count = ProjectorSettings.model_fields["batch_records_max"].metadata[-1].le
    records = [
        LogRecord(
            TOPICS.entries,
            0,
            n,
            b"t1",
            encode_entry(
                UsageAllocated(
                    entry_id=f"t1/usage/r{n}", tenant_id="t1", event_id=f"r{n}", occurred_at=12 + n,
                    model="m", prompt_tokens=1, completion_tokens=1, amount=1,
                    allocations=(Allocation("g1", 1),), overage=0,
                )
            ),
        )
        for n in range(count)
    ]

    dead_letters = await project(session_factory, records)

    assert dead_letters.letters == []
    assert rows(database_url, "SELECT count(*), sum(amount) FROM ledger_entries") == [(count, count)]
