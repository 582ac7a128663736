"""The usage index that lives beside an account: which usage event ids were applied (for duplicates) and
when usage of which model happened (for the rare questions the account's segment totals cannot answer
alone: how much of a segment's usage fell before a time inside it, and, for a tenant with credits scoped
to models, of which models; see ledger.scoped).

It grows with usage, which is why it is not part of the account state. `InMemoryUsageIndex` serves tests,
the calculator and audit replays; the stream processor keeps its index on disk (`streams.state_store`:
RocksDB with a bounded cache in front, since the index holds every usage id ever applied), and Postgres
provides its own; all implement the same protocol, and tests/streams/test_state_store.py runs one
contract suite over the in-memory and the on-disk index.
"""

from __future__ import annotations

import sys
from bisect import bisect_left, insort
from typing import NamedTuple, Protocol

NO_MODEL = ""  # the model of usage recorded before the index kept models: usage of no model


class UsageSummary(NamedTuple):
    """Usage in a half-open window [start, end): its total and the first and last usage time in it."""

    total: int
    first_at: int | None
    last_at: int | None


class UsageIndex(Protocol):
    def seen(self, event_id: str) -> bool:
        """True if this usage event was already applied (a duplicate)."""

    def record(self, event_id: str, occurred_at: int, amount: int, model: str) -> None:
        """Remember an applied usage event."""

    def usage_between(self, start: int, end: int) -> UsageSummary:
        """Usage with start <= occurred_at < end."""

    def usage_by_model_between(self, start: int, end: int) -> dict[str, int]:
        """Usage with start <= occurred_at < end by model: models with a positive total only, usage of
        no model (`NO_MODEL`) left out."""


class UsageHistory(NamedTuple):
    """What `InMemoryUsageIndex.usage_between` and `usage_by_model_between` answer from (no seen ids):
    usage by millisecond, and the model of each millisecond's usage (a model name, or the amounts by
    model when several models were used in that millisecond)."""

    amount_by_time: dict[int, int]
    models_at: dict[int, str | dict[str, int]]


class InMemoryUsageIndex:
    """Seen ids in a set, usage amounts by millisecond in a sorted list, each millisecond's model beside
    its amount (a name, shared: no object per usage). Appends in time order are O(1)."""

    __slots__ = ("_seen", "_times", "_amount_by_time", "_models_at")

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._times: list[int] = []
        self._amount_by_time: dict[int, int] = {}
        self._models_at: dict[int, str | dict[str, int]] = {}

    def seen(self, event_id: str) -> bool:
        return event_id in self._seen

    def record(self, event_id: str, occurred_at: int, amount: int, model: str) -> None:
        self._seen.add(event_id)
        amounts = self._amount_by_time
        if occurred_at in amounts:
            at = self._models_at[occurred_at]
            if at != model:  # a second model in this millisecond (a dict never equals a name)
                if type(at) is str:
                    at = self._models_at[occurred_at] = {at: amounts[occurred_at]}
                at[model] = at.get(model, 0) + amount
            amounts[occurred_at] += amount
            return
        amounts[occurred_at] = amount
        self._models_at[occurred_at] = sys.intern(model)
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

    def usage_by_model_between(self, start: int, end: int) -> dict[str, int]:
        times = self._times
        amounts, models_at = self._amount_by_time, self._models_at
        usage: dict[str, int] = {}
        for t in times[bisect_left(times, start) : bisect_left(times, end)]:
            at = models_at[t]
            if type(at) is str:
                usage[at] = usage.get(at, 0) + amounts[t]
            else:
                for model, amount in at.items():
                    usage[model] = usage.get(model, 0) + amount
        return {model: amount for model, amount in usage.items() if amount and model != NO_MODEL}

    def usage_by_time(self) -> dict[int, int]:
        """Usage amounts by millisecond (without models or seen ids)."""
        return dict(self._amount_by_time)

    def history(self) -> UsageHistory:
        """What the queries answer from, without the seen ids (for `for_queries`)."""
        models_at = {t: at if type(at) is str else dict(at) for t, at in self._models_at.items()}
        return UsageHistory(dict(self._amount_by_time), models_at)

    @classmethod
    def for_queries(cls, history: UsageHistory) -> InMemoryUsageIndex:
        """An index that answers the queries from `history()` of another one; it has no seen ids, so it
        is for point-in-time queries only, never for folding more events."""
        index = cls()
        index._amount_by_time = dict(history.amount_by_time)
        index._models_at = {t: at if type(at) is str else dict(at) for t, at in history.models_at.items()}
        index._times = sorted(history.amount_by_time)
        return index

    def __len__(self) -> int:
        return len(self._seen)
