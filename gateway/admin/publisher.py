"""What the admin API needs from the event bus: publish one ledger event, durably, or raise.

`streams.producer.EventProducer` satisfies it (its receipt is ignored); tests pass a recording one.
"""

from __future__ import annotations

from typing import Protocol

from ledger.events import Event


class EventPublisher(Protocol):
    async def publish(self, event: Event, /) -> object:
        """Return once the event is durably accepted; raise when it is not. The result is ignored."""
        ...
