"""API key -> tenant, with a short-lived cache so a warm key costs no database round trip.

The cache is keyed by the SHA-256 of the presented key (the raw key is not kept), holds answers for
`auth_cache_ttl_ms` (unknown and revoked keys too, so guessing does not reach the database each time),
and is bounded by `auth_cache_entries_max` (oldest entries go first).

A revoked key stops working at once: the admin API publishes `ApiKeyRevoked` on `tenant.keys`, and
`KeyRevocationFeed` (one per gateway process, over Kafka or the embedded log) tails it and calls
`TenantKeyCache.evict_key`. A lookup that was in flight when a revocation arrived is answered but not
cached, so it cannot put the revoked key back. The TTL stays as the fallback (a revocation published
while a gateway's tail was down, or whose publish failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.admission.budgets import KeyBudget
from gateway.api_keys import PRESENTED_KEY_LENGTH_MAX, resolve_api_key
from gateway.errors import ApiError
from gateway.logs import tenant_id_var
from streams.log import EventLog
from streams.records import LogRecord, decode_revocation

logger = logging.getLogger(__name__)

REVOCATION_TAIL_BATCH_MAX = 1_000
REVOCATION_TAIL_RESTART_MS = 1_000
REVOCATION_FEED_STOP_TIMEOUT_MS = 5_000


@dataclass(frozen=True, slots=True)
class TenantIdentity:
    tenant_id: str
    tier: str
    key_id: str | None = None  # the API key the request was made with (its usage events name it)
    budget: KeyBudget | None = None  # the key's spend limits when it has any (a change shows after the ttl)


def unauthorized(message: str) -> ApiError:
    return ApiError(
        401,
        message,
        error_type="invalid_request_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def bearer_key(authorization: str | None) -> str:
    """The key of an `Authorization: Bearer <key>` header, or a 401 saying what is wrong."""
    if not authorization:
        raise unauthorized("You didn't provide an API key: send it as 'Authorization: Bearer <key>'.")
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise unauthorized("The Authorization header must be 'Bearer <key>'.")
    if len(key) > PRESENTED_KEY_LENGTH_MAX:
        raise unauthorized("Incorrect API key provided.")
    return key


class TenantKeyCache:
    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        ttl_ms: int,
        entries_max: int,
        clock_ms: Callable[[], float] = lambda: time.monotonic() * 1000,
    ) -> None:
        self._session_factory = session_factory
        self._ttl_ms = ttl_ms
        self._entries_max = entries_max
        self._clock_ms = clock_ms
        # digest -> (expires at, identity or None, key id or None)
        self._entries: dict[bytes, tuple[float, TenantIdentity | None, str | None]] = {}
        self._digests_of_key: dict[str, set[bytes]] = {}  # key id -> its cached digests (for evict_key)
        self._evictions = 0  # evict_key calls so far: a lookup spanning one is not cached
        self._lookups: dict[bytes, asyncio.Future[TenantIdentity | None]] = {}  # one query per key at a time

    async def tenant_of(self, presented_key: str) -> TenantIdentity:
        digest = hashlib.sha256(presented_key.encode()).digest()
        now = self._clock_ms()
        cached = self._entries.get(digest)
        if cached is not None and cached[0] > now:
            identity = cached[1]
        else:
            identity = await self._lookup_once(digest, presented_key)
        if identity is None:
            raise unauthorized("Incorrect API key provided.")
        return identity

    async def _lookup_once(self, digest: bytes, presented_key: str) -> TenantIdentity | None:
        """Concurrent requests with the same uncached key share one database query."""
        in_flight = self._lookups.get(digest)
        if in_flight is not None:
            return await asyncio.shield(in_flight)
        future: asyncio.Future[TenantIdentity | None] = asyncio.get_running_loop().create_future()
        self._lookups[digest] = future
        evictions_before = self._evictions
        try:
            key_id, identity = await self._lookup(presented_key)
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved here, so a lookup nobody else awaited logs nothing
            raise
        finally:
            del self._lookups[digest]
        future.set_result(identity)
        if self._evictions == evictions_before:  # else the answer may predate a revocation: don't keep it
            self._remember(digest, self._clock_ms() + self._ttl_ms, identity, key_id)
        return identity

    async def _lookup(self, presented_key: str) -> tuple[str | None, TenantIdentity | None]:
        async with self._session_factory() as session:
            resolved = await resolve_api_key(session, presented_key)
        if resolved is None:
            return None, None
        api_key, tenant = resolved
        budget = KeyBudget(api_key.key_id, api_key.daily_credits, api_key.monthly_credits)
        limits = budget if budget.limited else None
        identity = TenantIdentity(tenant.tenant_id, tenant.tier, api_key.key_id, limits)
        return api_key.key_id, identity

    def evict_key(self, key_id: str) -> int:
        """Forget every cached answer for this key (it was revoked); the number of entries dropped."""
        self._evictions += 1
        digests = self._digests_of_key.pop(key_id, set())
        for digest in digests:
            self._entries.pop(digest, None)
        return len(digests)

    def _remember(
        self, digest: bytes, expires_at_ms: float, identity: TenantIdentity | None, key_id: str | None
    ) -> None:
        if self._ttl_ms == 0:
            return
        self._forget(digest)
        while len(self._entries) >= self._entries_max:
            self._forget(next(iter(self._entries)))
        self._entries[digest] = (expires_at_ms, identity, key_id)
        if key_id is not None:
            self._digests_of_key.setdefault(key_id, set()).add(digest)

    def _forget(self, digest: bytes) -> None:
        entry = self._entries.pop(digest, None)
        if entry is None or entry[2] is None:
            return
        digests = self._digests_of_key.get(entry[2])
        if digests is not None:
            digests.discard(digest)
            if not digests:
                del self._digests_of_key[entry[2]]


async def authenticate(key_cache: TenantKeyCache, authorization: str | None) -> TenantIdentity:
    """The tenant owning the `Authorization` header's bearer key (a 401 otherwise), set for the log lines."""
    tenant = await key_cache.tenant_of(bearer_key(authorization))
    tenant_id_var.set(tenant.tenant_id)
    return tenant


class KeyRevocationFeed:
    """Tails `tenant.keys` and evicts each revoked key from the cache as it arrives.

    From the beginning, not the end: a revocation published while the tail is starting is not missed,
    and replaying old ones only evicts what is not cached (the topic is compacted: one record per key).

        feed = KeyRevocationFeed(log, key_cache)
        await feed.start()   # in the app's lifespan, beside the key cache
        ...
        await feed.stop()
    """

    def __init__(self, log: EventLog, key_cache: TenantKeyCache) -> None:
        self.log = log
        self.key_cache = key_cache
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        assert self._task is None, "feed already started"
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(self._task, REVOCATION_FEED_STOP_TIMEOUT_MS / 1000)
        self._task = None

    def apply(self, records: Sequence[LogRecord]) -> None:
        for record in records:
            if record.value is None:
                continue  # a compaction tombstone: nothing to evict
            try:
                revocation = decode_revocation(record.value)
            except msgspec.DecodeError as error:
                logger.warning(
                    "tenant.keys[%d]@%d: not a revocation: %s", record.partition, record.offset, error
                )
                continue
            dropped = self.key_cache.evict_key(revocation.key_id)
            logger.info("key %s revoked: %d cached entries dropped", revocation.key_id, dropped)

    async def _follow(self) -> None:
        while True:
            try:
                tail = self.log.tail(
                    self.log.topics.keys, from_beginning=True, batch_max=REVOCATION_TAIL_BATCH_MAX
                )
                async for records in tail:
                    self.apply(records)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception(
                    "tail of tenant.keys failed; restarting in %d ms", REVOCATION_TAIL_RESTART_MS
                )
            await asyncio.sleep(REVOCATION_TAIL_RESTART_MS / 1000)
