"""The durable spool on its own: order, accounting, the size limit, reopening, one owner at a time."""

from __future__ import annotations

import pytest

from streams.spool import OutgoingRecord, Spool, SpoolError, SpoolFull


def records(count: int, *, value_bytes: int = 10) -> list[OutgoingRecord]:
    return [OutgoingRecord("ledger.events", f"tenant-{i % 3}".encode(), bytes([i % 256]) * value_bytes) for i in range(count)]


def test_records_come_back_in_append_order_and_leave_when_removed(tmp_path):
    spool = Spool(tmp_path / "spool.sqlite3", size_max_bytes=1_000_000)
    first = spool.append(records(5))
    second = spool.append(records(3))
    assert first + second == sorted(first + second)
    oldest = spool.oldest(limit=6)
    assert [record.seq for record in oldest] == (first + second)[:6]
    assert [record.value for record in oldest[:5]] == [record.value for record in records(5)]
    assert spool.remove([record.seq for record in oldest[:4]]) == 4
    assert [record.seq for record in spool.oldest(limit=10)] == (first + second)[4:]
    assert spool.count() == 4
    assert spool.size_bytes() == sum(record.size_bytes for record in records(5)[4:] + records(3))
    spool.close()


def test_full_spool_refuses_all_and_keeps_what_it_has(tmp_path):
    one_record_bytes = records(1)[0].size_bytes
    spool = Spool(tmp_path / "spool.sqlite3", size_max_bytes=one_record_bytes * 4)
    spool.append(records(3))
    with pytest.raises(SpoolFull, match="spool_size_max_bytes"):
        spool.append(records(2))
    assert spool.count() == 3
    spool.append(records(1))
    assert spool.count() == 4
    spool.close()


def test_reopened_spool_keeps_records_and_accounting(tmp_path):
    path = tmp_path / "spool.sqlite3"
    spool = Spool(path, size_max_bytes=1_000_000)
    sequence_numbers = spool.append(records(7))
    spool.remove(sequence_numbers[:2])
    spool.close()
    reopened = Spool(path, size_max_bytes=1_000_000)
    assert [record.seq for record in reopened.oldest(limit=100)] == sequence_numbers[2:]
    assert reopened.count() == 5
    assert reopened.size_bytes() == sum(record.size_bytes for record in records(7)[2:])
    later = reopened.append(records(1))
    assert later[0] > sequence_numbers[-1]
    reopened.close()


def test_one_owner_at_a_time(tmp_path):
    path = tmp_path / "spool.sqlite3"
    spool = Spool(path, size_max_bytes=1_000_000)
    with pytest.raises(SpoolError, match="in use"):
        Spool(path, size_max_bytes=1_000_000)
    spool.close()
    Spool(path, size_max_bytes=1_000_000).close()


def test_closed_spool_says_so(tmp_path):
    spool = Spool(tmp_path / "spool.sqlite3", size_max_bytes=1_000_000)
    spool.close()
    with pytest.raises(SpoolError, match="closed"):
        spool.append(records(1))
