"""A simulated event log for the processor simulation: the `EventLog` contract in memory, with faults.

- Topics of ordered partitions; offsets start at 0 and grow by one per record within a partition.
- Consumer positions: a consumer reads a partition from its position; `commit` stores a group's next
  offset; a restarted or new owner resumes from the committed offset (redelivery).
- The state changelog is a compacted topic: reading it back gives every key's latest value (compaction
  may run at any time and changes nothing a reader sees, which is what `compact` lets the simulation
  check).
- Faults: `SimulatedTransport` (the engine's `EngineTransport`) asks the `FaultPlan` before every single
  record it appends, so a crash can fall between any two writes (in the middle of the state writes, or
  of the outputs); an "acknowledgement lost" fault appends the records and still raises
  `BrokerUnavailable`, as a broker that stored a batch but whose ack never arrived.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from streams.producer import BrokerUnavailable, PartitionedRecord
from streams.records import LogRecord

STATE_READ_CHUNK_RECORDS = 3  # small, so that a partition's state is read back over several chunks


class SimulatedCrash(Exception):
    """The processor process died (kill -9) at a write boundary: nothing after this point happened."""


@dataclass
class SimulatedLog:
    partitions: int
    topics: dict[str, list[list[LogRecord]]] = field(default_factory=dict)
    committed: dict[tuple[str, int], int] = field(default_factory=dict)  # (group, partition) -> next offset
    clock_ms: int = 0  # the log's append time, stamped on every record

    def partition_log(self, topic: str, partition: int) -> list[LogRecord]:
        partitions = self.topics.setdefault(topic, [[] for _ in range(self.partitions)])
        return partitions[partition]

    def append(self, topic: str, partition: int, key: bytes | None, value: bytes | None) -> LogRecord:
        records = self.partition_log(topic, partition)
        record = LogRecord(topic, partition, len(records), key, value, self.clock_ms)
        records.append(record)
        return record

    def read(self, topic: str, partition: int, from_offset: int, max_records: int) -> list[LogRecord]:
        return self.partition_log(topic, partition)[from_offset : from_offset + max_records]

    def end_offset(self, topic: str, partition: int) -> int:
        return len(self.partition_log(topic, partition))

    def commit(self, group: str, partition: int, next_offset: int) -> None:
        assert next_offset >= self.committed.get((group, partition), 0), (
            "a group's committed offset never goes back"
        )
        self.committed[(group, partition)] = next_offset

    def committed_offset(self, group: str, partition: int) -> int:
        return self.committed.get((group, partition), 0)

    def compact(self, topic: str, partition: int) -> None:
        """Keep each key's latest record (offsets are kept, as Kafka's compaction keeps them)."""
        records = self.partition_log(topic, partition)
        latest = {record.key: record.offset for record in records}
        kept = {offset for offset in latest.values()}
        # A compacted topic keeps its offsets: placeholders stand for removed records and are skipped on read.
        records[:] = [record if record.offset in kept else _REMOVED for record in records]

    def read_compacted(self, topic: str, partition: int) -> list[tuple[bytes, bytes | None]]:
        return [(r.key, r.value) for r in self.partition_log(topic, partition) if r is not _REMOVED]


_REMOVED = LogRecord("", -1, -1, None, None, -1)


@dataclass
class FaultPlan:
    """Decides, before each record a processor appends, whether the process dies there or the broker
    drops the batch's acknowledgement. Seeded: the same seed makes the same decisions."""

    rng: random.Random
    crash_probability: float
    ack_lost_probability: float
    crashes: int = 0
    acks_lost: int = 0

    def before_write(self) -> None:
        if self.rng.random() < self.crash_probability:
            self.crashes += 1
            raise SimulatedCrash()

    def ack_lost(self) -> bool:
        if self.rng.random() < self.ack_lost_probability:
            self.acks_lost += 1
            return True
        return False


class SimulatedTransport:
    """`streams.batch_processor.EngineTransport` over the simulated log, for one processor process."""

    def __init__(self, log: SimulatedLog, changelog_topic: str, faults: FaultPlan) -> None:
        self.log = log
        self.changelog_topic = changelog_topic
        self.faults = faults

    async def write_state(self, records: list[PartitionedRecord]) -> None:
        self._append(records)

    async def publish(self, records: list[PartitionedRecord]) -> None:
        self._append(records)

    async def read_state(self, partition: int):
        """The compacted changelog in chunks of `STATE_READ_CHUNK_RECORDS`, as the broker's fetches come."""
        records = self.log.read_compacted(self.changelog_topic, partition)
        for start in range(0, len(records), STATE_READ_CHUNK_RECORDS):
            yield records[start : start + STATE_READ_CHUNK_RECORDS]

    def _append(self, records: list[PartitionedRecord]) -> None:
        for record in records:
            self.faults.before_write()  # what reached the log before a crash stays there (finance sees it)
            self.log.append(record.topic, record.partition, record.key, record.value)
        if self.faults.ack_lost():
            raise BrokerUnavailable("simulated: the batch was stored but its acknowledgement was lost")
