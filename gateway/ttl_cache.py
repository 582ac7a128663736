"""A read-through cache of values kept for a time (a tenant's policy, a model's route) that never makes a
request wait on the database once a value is known.

A key never seen is loaded and awaited. A value past its `ttl_ms` is still answered for another `ttl_ms`
while one reload runs in the background (stale-while-revalidate); older than that, the reload is awaited.
Under load every request used to miss together when a value expired and each queried the database,
queueing on the connection pool (first-token p99 of hundreds of milliseconds in bench.gateway).
Concurrent misses of one key share a single load. A change in the table applies within `ttl_ms` plus one
query for a key in steady use, and at once with `ttl_ms` 0. At most `entries_max` keys are kept; beyond that
the cache starts empty again (refilled on demand). A failed load is not cached: the next request retries,
and the caller that awaited it gets the error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Key = TypeVar("Key")
Value = TypeVar("Value")

log = logging.getLogger(__name__)


class TtlCache(Generic[Key, Value]):
    def __init__(self, load: Callable[[Key], Awaitable[Value]], ttl_ms: int, entries_max: int) -> None:
        assert ttl_ms >= 0 and entries_max >= 1, f"ttl_ms {ttl_ms}, entries_max {entries_max}"
        self._load = load
        self._ttl_ms = ttl_ms
        self._entries_max = entries_max
        self._entries: dict[Key, tuple[float, Value]] = {}  # key -> (fresh until, monotonic ms; value)
        self._loading: dict[Key, asyncio.Task] = {}

    async def get(self, key: Key) -> Value:
        cached = self._entries.get(key)
        if cached is None:
            return await asyncio.shield(self._reload(key))
        fresh_until, value = cached
        now = _now_ms()
        if now < fresh_until:
            return value
        if now < fresh_until + self._ttl_ms:
            self._reload(key)  # in the background: this request gets the value it has
            return value
        return await asyncio.shield(self._reload(key))

    def put(self, key: Key, value: Value) -> None:
        """A value the caller just wrote (fresh for `ttl_ms`)."""
        if len(self._entries) >= self._entries_max and key not in self._entries:
            self._entries.clear()
        self._entries[key] = (_now_ms() + self._ttl_ms, value)

    def _reload(self, key: Key) -> asyncio.Task:
        loading = self._loading.get(key)
        if loading is None:
            loading = self._loading[key] = asyncio.ensure_future(self._load_and_keep(key))
            loading.add_done_callback(_retrieve_error)
        return loading

    async def _load_and_keep(self, key: Key) -> Value:
        try:
            value = await self._load(key)
            self.put(key, value)
            return value
        finally:
            del self._loading[key]


def _now_ms() -> float:
    return time.monotonic() * 1000


def _retrieve_error(task: asyncio.Task) -> None:
    """A background reload that failed (the stale value was answered): logged, retried on the next get."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("cache reload failed (retried on the next request): %r", task.exception())
