"""A dead-letter log for projector tests: keeps what the projector appends, in order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from streams.records import DeadLetter, LogPosition
from streams.spool import OutgoingRecord


@dataclass
class RecordingDeadLetters:
    records: list[OutgoingRecord] = field(default_factory=list)

    async def append_many(self, records: Sequence[OutgoingRecord]) -> list[LogPosition]:
        first = len(self.records)
        self.records.extend(records)
        return [LogPosition(record.topic, 0, first + number) for number, record in enumerate(records)]

    @property
    def letters(self) -> list[DeadLetter]:
        return [msgspec.json.decode(record.value, type=DeadLetter) for record in self.records]
