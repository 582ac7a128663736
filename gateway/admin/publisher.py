"""What the admin API needs from the event bus: publish one ledger event, or append a raw record to a
named topic (key revocations on `topics.keys`), durably, or raise.

`streams.log.EventLog` (Kafka or embedded) satisfies it (its receipts are ignored); tests pass a
recording one.
"""

from __future__ import annotations

from typing import Protocol

from ledger.events import Event
from streams.topics import LedgerTopics


class EventPublisher(Protocol):
    topics: LedgerTopics

    async def publish(self, event: Event, /) -> object:
        """Return once the event is durably accepted; raise when it is not. The result is ignored."""
        ...

    async def append(self, topic: str, key: bytes, value: bytes, /) -> object:
        """Return once the record is durably accepted; raise when it is not. The result is ignored."""
        ...
