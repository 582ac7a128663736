"""The durable spool on its own: order, accounting, the size limit, reopening, one owner at a time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streams.producer import open_spool
from streams.settings import StreamSettings
from streams.spool import OutgoingRecord, Spool, SpoolError, SpoolFull


def records(count: int, *, value_bytes: int = 10) -> list[OutgoingRecord]:
    return [
        OutgoingRecord("ledger.events", f"tenant-{i % 3}".encode(), bytes([i % 256]) * value_bytes)
        for i in range(count)
    ]


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


# ------------------------------------------------------------------------ one spool per process, by default

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 30

# A producer process: opens its own spool in the directory, appends `count` records, says where, and
# holds the spool until its stdin closes (or it is killed).
CHILD = """
import sys
from pathlib import Path
from streams.producer import open_spool
from streams.settings import StreamSettings
from streams.spool import OutgoingRecord
spool = open_spool(StreamSettings(spool_dir=Path(sys.argv[1])))
spool.append([OutgoingRecord("ledger.events", b"acme", f"{sys.argv[2]}-{n}".encode()) for n in
range(int(sys.argv[3]))])
print(spool.path, flush=True)
sys.stdin.read()
"""


def start_producer(directory: Path, tag: str, count: int) -> tuple[subprocess.Popen, Path]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), tag, str(count)],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = child.stdout.readline()
    assert line, child.stderr.read()
    return child, Path(line.strip())


def test_two_processes_with_default_settings_each_get_their_own_spool(tmp_path):
    """The defect: both defaulted to one spool file, so the second `tollgate streams` died on its lock."""
    assert StreamSettings().spool_path is None, "no shared file by default"
    first, first_path = start_producer(tmp_path, "a", 2)
    second, second_path = start_producer(tmp_path, "b", 3)
    try:
        assert first_path != second_path
        assert {first_path.parent, second_path.parent} == {tmp_path}
        assert f"-{first.pid}." in first_path.name and f"-{second.pid}." in second_path.name
    finally:
        for child in (first, second):
            child.communicate(timeout=CHILD_TIMEOUT_S)
    assert (first.returncode, second.returncode) == (0, 0)


def test_a_restarted_process_adopts_the_unsent_records_of_a_dead_one_in_order(tmp_path):
    alive, alive_path = start_producer(tmp_path, "alive", 1)  # holds its spool: not adoptable
    dead, dead_path = start_producer(tmp_path, "dead", 4)
    dead.kill()  # SIGKILL: nothing cleaned up, the records are all that is left
    dead.communicate(timeout=CHILD_TIMEOUT_S)
    try:
        spool = open_spool(StreamSettings(spool_dir=tmp_path))
        try:
            assert [r.value for r in spool.oldest(100)] == [f"dead-{n}".encode() for n in range(4)]
            assert not dead_path.exists() and not Path(f"{dead_path}.lock").exists(), "the orphan is gone"
            assert alive_path.exists(), "a live process keeps its spool"
        finally:
            spool.close()
    finally:
        alive.communicate(timeout=CHILD_TIMEOUT_S)


def test_a_named_spool_path_is_one_file_with_one_owner(tmp_path):
    settings = StreamSettings(spool_path=tmp_path / "one.sqlite3")
    spool = open_spool(settings)
    try:
        with pytest.raises(SpoolError, match="TOLLGATE_SPOOL_PATH"):
            open_spool(settings)
    finally:
        spool.close()
