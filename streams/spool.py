"""A durable, bounded, ordered spool of records the broker has not acknowledged yet.

SQLite in WAL mode with synchronous=FULL: `append` returns only once the records are fsync'd, so a
crash of the process (or of the machine) after `append` loses nothing. Records come back in the order
they were appended (`seq`); `remove` deletes them once the broker has acknowledged them.

The spool is bounded by `size_max_bytes` (the sum of key and value lengths it holds): a full spool
raises SpoolFull and takes nothing, so the caller knows the record was not accepted (nothing is ever
dropped silently). One process owns a spool file at a time (an exclusive lock beside it says so).

Each process has a spool of its own by default (`open_process_spool`): `<name>-<pid>.sqlite3` in the spool
directory, so any number of producers can share one directory. Durability across restarts: on opening, a
process adopts every other spool file of the directory whose lock it can take (the lock is an flock,
released by the kernel when its owner dies however it died, so a free lock means a dead owner): it copies
the orphan's records into its own spool in their order (one transaction), then deletes the orphan. Two
processes starting together never adopt the same file (only one of them gets its lock). A record copied
but not yet deleted when a crash strikes is sent twice; event ids make the second one a no-op.

The methods are blocking (one SQLite transaction each); async callers run them in a worker thread.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spooled_record (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    key BLOB,
    value BLOB NOT NULL,
    size_bytes INTEGER NOT NULL,
    spooled_at_ms INTEGER NOT NULL
)
"""


_PARAMETERS_PER_STATEMENT_MAX = 900  # below SQLite's bound-parameter limit on every build
SPOOL_SUFFIX = ".sqlite3"
_SIDE_FILE_SUFFIXES = ("-wal", "-shm", ".lock")  # SQLite's WAL files and our lock, beside a spool file

log = logging.getLogger(__name__)


class SpoolError(RuntimeError):
    """The spool cannot be used (another process holds it, or it is closed)."""


class SpoolLocked(SpoolError):
    """Another live process holds this spool file."""


class SpoolFull(SpoolError):
    """Accepting the records would exceed the spool's size limit; none of them was accepted."""


@dataclass(frozen=True)
class OutgoingRecord:
    topic: str
    key: bytes | None
    value: bytes

    @property
    def size_bytes(self) -> int:
        return len(self.key or b"") + len(self.value)


@dataclass(frozen=True)
class SpooledRecord:
    seq: int
    topic: str
    key: bytes | None
    value: bytes


class Spool:
    def __init__(self, path: Path, size_max_bytes: int) -> None:
        assert size_max_bytes > 0, "size_max_bytes must be positive"
        self.path = Path(path)
        self.size_max_bytes = size_max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._lock_exclusively(self.path)
        self._mutex = threading.Lock()
        self._connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=FULL")
        self._connection.execute(_SCHEMA)
        count, size = self._connection.execute(
            "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM spooled_record"
        ).fetchone()
        self._count = count
        self._size_bytes = size

    @staticmethod
    def _lock_exclusively(path: Path):
        lock_file = open(str(path) + ".lock", "a+")  # noqa: SIM115 - held open for the spool's lifetime
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise SpoolLocked(
                f"spool {path} is in use by another process: give each producer its own file "
                "(unset TOLLGATE_SPOOL_PATH to get one per process in TOLLGATE_SPOOL_DIR)"
            ) from None
        lock_file.truncate(0)
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        return lock_file

    def append(self, records: Sequence[OutgoingRecord]) -> list[int]:
        """Durably store `records` (all or none); return their sequence numbers, in order."""
        incoming_bytes = sum(record.size_bytes for record in records)
        now_ms = int(time.time() * 1000)
        with self._mutex:
            self._check_open()
            if self._size_bytes + incoming_bytes > self.size_max_bytes:
                raise SpoolFull(
                    f"spool {self.path} holds {self._count} records ({self._size_bytes} bytes); "
                    f"{len(records)} more ({incoming_bytes} bytes) would exceed spool_size_max_bytes="
                    f"{self.size_max_bytes}: the broker has been unreachable too long"
                )
            sequence_numbers = []
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                for record in records:
                    cursor = self._connection.execute(
                        "INSERT INTO spooled_record (topic, key, value, size_bytes, spooled_at_ms)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (record.topic, record.key, record.value, record.size_bytes, now_ms),
                    )
                    sequence_numbers.append(cursor.lastrowid)
                self._connection.execute("COMMIT")
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._count += len(records)
            self._size_bytes += incoming_bytes
        return sequence_numbers

    def oldest(self, limit: int) -> list[SpooledRecord]:
        """Up to `limit` records, oldest first."""
        assert limit > 0, "limit must be positive"
        with self._mutex:
            self._check_open()
            rows = self._connection.execute(
                "SELECT seq, topic, key, value FROM spooled_record ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [SpooledRecord(seq=seq, topic=topic, key=key, value=value) for seq, topic, key, value in rows]

    def remove(self, sequence_numbers: Iterable[int]) -> int:
        """Delete the records the broker acknowledged; return how many were deleted."""
        seqs = list(sequence_numbers)
        if not seqs:
            return 0
        removed_count = removed_bytes = 0
        with self._mutex:
            self._check_open()
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                for start in range(0, len(seqs), _PARAMETERS_PER_STATEMENT_MAX):
                    chunk = seqs[start : start + _PARAMETERS_PER_STATEMENT_MAX]
                    placeholders = ",".join("?" * len(chunk))
                    count, size = self._connection.execute(
                        "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM spooled_record"
                        f" WHERE seq IN ({placeholders})",
                        chunk,
                    ).fetchone()
                    self._connection.execute(
                        f"DELETE FROM spooled_record WHERE seq IN ({placeholders})", chunk
                    )
                    removed_count += count
                    removed_bytes += size
                self._connection.execute("COMMIT")
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._count -= removed_count
            self._size_bytes -= removed_bytes
            assert self._count >= 0, f"spool record count went negative ({self._count})"
            assert self._size_bytes >= 0, f"spool size went negative ({self._size_bytes} bytes)"
        return removed_count

    def count(self) -> int:
        return self._count

    def size_bytes(self) -> int:
        return self._size_bytes

    def close(self) -> None:
        with self._mutex:
            if self._connection is None:
                return
            self._connection.close()
            self._connection = None
            self._lock_file.close()

    def delete(self) -> None:
        """Close and remove the spool's files; the lock is released last, so no process opens them
        meanwhile."""
        with self._mutex:
            self._check_open()
            self._connection.close()
            self._connection = None
            for suffix in ("", *_SIDE_FILE_SUFFIXES):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            self._lock_file.close()

    def _check_open(self) -> None:
        if self._connection is None:
            raise SpoolError(f"spool {self.path} is closed")


def open_process_spool(directory: Path, size_max_bytes: int, *, name: str = "producer") -> Spool:
    """This process's own spool in `directory`, `<name>-<pid>.sqlite3`, after adopting the records of every
    spool there whose owner is gone (see the module docstring)."""
    directory = Path(directory)
    spool = Spool(directory / f"{name}-{os.getpid()}{SPOOL_SUFFIX}", size_max_bytes)
    try:
        for path in sorted(directory.glob(f"*{SPOOL_SUFFIX}")):
            if path != spool.path:
                try:
                    adopt_orphan(spool, path)
                except SpoolFull as error:
                    log.warning("left orphaned spool %s in place: %s", path, error)
    except BaseException:
        spool.close()
        raise
    return spool


def adopt_orphan(spool: Spool, orphan_path: Path) -> int:
    """Move the records of `orphan_path` into `spool` if no live process owns it; how many were moved.
    An orphan too big for `spool`'s room stays where it is (SpoolFull), whole."""
    try:
        orphan = Spool(orphan_path, size_max_bytes=2**62)  # takes its lock: fails while its owner lives
    except SpoolLocked:
        return 0
    try:
        records = orphan.oldest(2**62) if orphan.count() else []
        if records:
            spool.append([OutgoingRecord(r.topic, r.key, r.value) for r in records])
            log.warning("adopted %d unsent records from %s (its process is gone)", len(records), orphan_path)
        orphan.delete()
    except BaseException:
        orphan.close()
        raise
    return len(records)
