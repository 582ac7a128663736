"""The records every log carries, transport-free: what a consumer reads and where an append went."""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka.partitioner import murmur2


@dataclass(frozen=True, slots=True)
class LogRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int = 0  # the log's append time; 0 where a test or tool does not know it


@dataclass(frozen=True, slots=True)
class LogPosition:
    """Where an appended record went; `spooled` when the broker was away and it waits in the spool."""

    topic: str
    partition: int | None
    offset: int | None
    spooled: bool = False


def partition_for_key(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (murmur2, positive, modulo), so both logs place a key alike."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
