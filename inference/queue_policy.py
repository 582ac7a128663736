"""The order in which waiting requests are admitted: FCFS, or priority by tier with aging.

Priority with aging: a request that has waited `aging_ms_per_tier_level` milliseconds is lifted one tier
level. Comparing two waiting requests a and b at any time `now`,
    a.level - (now - a.arrival) / g  <  b.level - (now - b.arrival) / g
is the same as  a.level * g + a.arrival  <  b.level * g + b.arrival,
which does not depend on `now`: the order is a static key and a heap keeps it. A low tier is delayed by
at most (its level - the top level) * g behind later arrivals, and is never starved.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator

from inference.request import Request


class WaitingQueue(ABC):
    @abstractmethod
    def add(self, request: Request) -> None: ...

    @abstractmethod
    def pop(self) -> Request: ...

    @abstractmethod
    def requeue(self, request: Request) -> None:
        """Put back a request that was popped (or preempted) ahead of those that came after it."""

    @abstractmethod
    def preemption_key(self, request: Request) -> tuple[int, ...]:
        """The running request with the largest key is preempted first: the lowest priority, most recent."""

    @abstractmethod
    def remove(self, request_ids: set[str]) -> list[Request]:
        """Take out the named requests (those present); returns them."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[Request]: ...


class FcfsQueue(WaitingQueue):
    def __init__(self) -> None:
        self._requests: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._requests.append(request)

    def pop(self) -> Request:
        assert self._requests, "pop() on an empty queue"
        return self._requests.popleft()

    def requeue(self, request: Request) -> None:
        self._requests.appendleft(request)

    def preemption_key(self, request: Request) -> tuple[int, ...]:
        return (request.arrival_index,)

    def remove(self, request_ids: set[str]) -> list[Request]:
        removed = [r for r in self._requests if r.request_id in request_ids]
        if removed:
            self._requests = deque(r for r in self._requests if r.request_id not in request_ids)
        return removed

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests)


class PriorityAgingQueue(WaitingQueue):
    def __init__(self, aging_ms_per_tier_level: int) -> None:
        assert aging_ms_per_tier_level > 0, "aging_ms_per_tier_level must be positive"
        self._aging_ms_per_tier_level = aging_ms_per_tier_level
        self._heap: list[tuple[int, int, Request]] = []

    def sort_key(self, request: Request) -> tuple[int, int]:
        return (
            request.tier_level * self._aging_ms_per_tier_level + request.arrival_ms,
            request.arrival_index,
        )

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (*self.sort_key(request), request))

    def pop(self) -> Request:
        assert self._heap, "pop() on an empty queue"
        return heapq.heappop(self._heap)[2]

    def requeue(self, request: Request) -> None:
        self.add(request)  # its key is static: it goes back to its place

    def preemption_key(self, request: Request) -> tuple[int, ...]:
        return self.sort_key(request)

    def remove(self, request_ids: set[str]) -> list[Request]:
        removed = [entry[2] for entry in self._heap if entry[2].request_id in request_ids]
        if removed:
            # The queue is bounded (waiting_queue_depth_max), so rebuilding the heap is cheap.
            self._heap = [entry for entry in self._heap if entry[2].request_id not in request_ids]
            heapq.heapify(self._heap)
        return removed

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[2] for entry in sorted(self._heap, key=lambda entry: entry[:2]))


def create_waiting_queue(policy: str, aging_ms_per_tier_level: int) -> WaitingQueue:
    if policy == "fcfs":
        return FcfsQueue()
    if policy == "priority":
        return PriorityAgingQueue(aging_ms_per_tier_level)
    raise ValueError(f"unknown queue policy {policy!r}; expected 'fcfs' or 'priority'")
