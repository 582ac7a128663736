"""The usage index that lives beside an account: which usage event ids were applied (for duplicates) and
when usage happened (for the rare question the account's segment totals cannot answer alone: how much
of a segment's usage fell before a time inside it).

It grows with usage, which is why it is not part of the account state. `InMemoryUsageIndex` serves tests,
the calculator and audit replays; the stream processor keeps its index on disk (`streams.state_store`:
RocksDB with a bounded cache in front, since the index holds every usage id ever applied), and Postgres
provides its own; all implement the same protocol, and tests/streams/test_state_store.py runs one
contract suite over the in-memory and the on-disk index.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import NamedTuple, Protocol


class UsageSummary(NamedTuple):
    """Usage in a half-open window [start, end): its total and the first and last usage time in it."""

    total: int
    first_at: int | None
    last_at: int | None


class UsageIndex(Protocol):
    def seen(self, event_id: str) -> bool:
        """True if this usage event was already applied (a duplicate)."""

    def record(self, event_id: str, occurred_at: int, amount: int) -> None:
        """Remember an applied usage event."""

    def usage_between(self, start: int, end: int) -> UsageSummary:
        """Usage with start <= occurred_at < end."""


class InMemoryUsageIndex:
    """Seen ids in a set, usage amounts by millisecond in a sorted list. Appends in time order are O(1)."""

    __slots__ = ("_seen", "_times", "_amount_by_time")

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._times: list[int] = []
        self._amount_by_time: dict[int, int] = {}

    def seen(self, event_id: str) -> bool:
        return event_id in self._seen

    def record(self, event_id: str, occurred_at: int, amount: int) -> None:
        self._seen.add(event_id)
        amounts = self._amount_by_time
        if occurred_at in amounts:
            amounts[occurred_at] += amount
            return
        amounts[occurred_at] = amount
        times = self._times
        if not times or occurred_at > times[-1]:
            times.append(occurred_at)
        else:
            insort(times, occurred_at)

    def usage_between(self, start: int, end: int) -> UsageSummary:
        times = self._times
        low = bisect_left(times, start)
        high = bisect_left(times, end)
        if low >= high:
            return UsageSummary(0, None, None)
        amounts = self._amount_by_time
        total = sum(amounts[t] for t in times[low:high])
        return UsageSummary(total, times[low], times[high - 1])

    def usage_by_time(self) -> dict[int, int]:
        """Usage amounts by millisecond: what `usage_between` answers from (without the seen ids)."""
        return dict(self._amount_by_time)

    @classmethod
    def for_queries(cls, amount_by_time: dict[int, int]) -> InMemoryUsageIndex:
        """An index that answers `usage_between` from `usage_by_time()` of another one; it has no seen ids,
        so it is for point-in-time queries only, never for folding more events."""
        index = cls()
        index._amount_by_time = dict(amount_by_time)
        index._times = sorted(amount_by_time)
        return index

    def __len__(self) -> int:
        return len(self._seen)
