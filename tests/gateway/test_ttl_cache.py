"""gateway.ttl_cache: loads once per key however many ask at once, answers a stale value while one reload
runs, never caches a failure, and stays bounded."""

import asyncio

import pytest

from gateway.ttl_cache import TtlCache


class CountingLoader:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release = asyncio.Event()
        self.version = 0
        self.fail = False

    async def __call__(self, key: str) -> str:
        self.calls.append(key)
        await self.release.wait()
        if self.fail:
            raise RuntimeError("database away")
        return f"{key}@{self.version}"


async def test_concurrent_misses_of_one_key_share_a_single_load():
    loader = CountingLoader()
    cache = TtlCache(loader, ttl_ms=60_000, entries_max=10)
    waiting = [asyncio.create_task(cache.get("acme")) for _ in range(50)]
    await asyncio.sleep(0)
    loader.release.set()
    assert await asyncio.gather(*waiting) == ["acme@0"] * 50
    assert loader.calls == ["acme"]
    assert await cache.get("acme") == "acme@0" and loader.calls == ["acme"]  # fresh: no load


async def test_an_expired_value_is_answered_at_once_while_one_reload_runs():
    loader = CountingLoader()
    loader.release.set()
    cache = TtlCache(loader, ttl_ms=100, entries_max=10)
    assert await cache.get("acme") == "acme@0"
    await asyncio.sleep(0.12)  # stale, within the window it is still answered in
    loader.release.clear()
    loader.version = 1
    answers = [await cache.get("acme") for _ in range(20)]  # nobody waits for the database
    assert answers == ["acme@0"] * 20
    await asyncio.sleep(0)  # the reload task starts
    assert loader.calls == ["acme", "acme"]  # one reload in flight, not twenty
    loader.release.set()
    await asyncio.sleep(0.01)
    assert await cache.get("acme") == "acme@1"


async def test_with_ttl_zero_every_get_reads_the_table_and_concurrent_ones_share_the_read():
    loader = CountingLoader()
    loader.release.set()
    cache = TtlCache(loader, ttl_ms=0, entries_max=10)
    assert await cache.get("acme") == "acme@0"
    loader.version = 1
    assert await cache.get("acme") == "acme@1"  # a change applies at once
    loader.release.clear()
    waiting = [asyncio.create_task(cache.get("acme")) for _ in range(10)]
    await asyncio.sleep(0)
    loader.release.set()
    assert await asyncio.gather(*waiting) == ["acme@1"] * 10
    assert loader.calls == ["acme"] * 3


async def test_a_failed_load_is_not_cached_and_a_failed_reload_keeps_the_old_value():
    loader = CountingLoader()
    loader.release.set()
    loader.fail = True
    cache = TtlCache(loader, ttl_ms=100, entries_max=10)
    with pytest.raises(RuntimeError):
        await cache.get("acme")
    loader.fail = False
    assert await cache.get("acme") == "acme@0"  # retried, not the error again
    loader.fail = True
    await asyncio.sleep(0.12)
    assert await cache.get("acme") == "acme@0"  # stale; its reload fails in the background
    await asyncio.sleep(0.01)
    assert await cache.get("acme") == "acme@0"


async def test_it_keeps_at_most_entries_max_keys_and_put_replaces():
    loader = CountingLoader()
    loader.release.set()
    cache = TtlCache(loader, ttl_ms=60_000, entries_max=3)
    for key in ("a", "b", "c", "d"):
        await cache.get(key)
    assert len(cache._entries) <= 3
    cache.put("a", "written")
    assert await cache.get("a") == "written"
