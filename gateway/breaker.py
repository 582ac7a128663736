"""A circuit breaker per worker: after `failures_max` consecutive failures it opens and refuses the
worker for `open_ms`; then one trial request is let through (half-open). A success closes it, a failure
opens it again. Backpressure (an overloaded answer) is neither: a full queue is a healthy worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def monotonic_ms() -> float:
    return time.monotonic() * 1000


class CircuitBreaker:
    def __init__(self, failures_max: int, open_ms: int, clock_ms: Callable[[], float] = monotonic_ms) -> None:
        assert failures_max >= 1, f"a breaker needs failures_max >= 1, got {failures_max}"
        assert open_ms >= 1, f"a breaker needs open_ms >= 1, got {open_ms}"
        self.failures_max = failures_max
        self.open_ms = open_ms
        self._clock_ms = clock_ms
        self.consecutive_failures = 0
        self._opened_at_ms: float | None = None
        self._trial_in_flight = False

    @property
    def state(self) -> str:
        if self._opened_at_ms is None:
            return "closed"
        if self._clock_ms() - self._opened_at_ms < self.open_ms:
            return "open"
        return "half_open"

    def allow(self) -> bool:
        """May a request go to this worker now? In half-open, only one trial at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._trial_in_flight:
            return False
        self._trial_in_flight = True
        return True

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self._opened_at_ms = None
        self._trial_in_flight = False

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        self._trial_in_flight = False
        if self._opened_at_ms is not None or self.consecutive_failures >= self.failures_max:
            self._opened_at_ms = self._clock_ms()

    def record_neutral(self) -> None:
        """The worker answered, but the answer says nothing about its health (e.g. overloaded)."""
        self._trial_in_flight = False
