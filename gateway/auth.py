"""API key -> tenant, with a short-lived cache so a warm key costs no database round trip.

The cache is keyed by the SHA-256 of the presented key (the raw key is not kept), holds answers for
`auth_cache_ttl_ms` (unknown and revoked keys too, so guessing does not reach the database each time),
and is bounded by `auth_cache_entries_max` (oldest entries go first). A revoked key therefore stops
working within the TTL.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.api_keys import PRESENTED_KEY_LENGTH_MAX, resolve_key
from gateway.errors import ApiError
from gateway.logs import tenant_id_var


@dataclass(frozen=True, slots=True)
class TenantIdentity:
    tenant_id: str
    tier: str


def unauthorized(message: str) -> ApiError:
    return ApiError(
        401, message, error_type="invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
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
        self._entries: dict[bytes, tuple[float, TenantIdentity | None]] = {}
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
        try:
            identity = await self._lookup(presented_key)
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved here, so a lookup nobody else awaited logs nothing
            raise
        finally:
            del self._lookups[digest]
        future.set_result(identity)
        self._remember(digest, self._clock_ms() + self._ttl_ms, identity)
        return identity

    async def _lookup(self, presented_key: str) -> TenantIdentity | None:
        async with self._session_factory() as session:
            tenant = await resolve_key(session, presented_key)
        return None if tenant is None else TenantIdentity(tenant.tenant_id, tenant.tier)

    def _remember(self, digest: bytes, expires_at_ms: float, identity: TenantIdentity | None) -> None:
        if self._ttl_ms == 0:
            return
        self._entries.pop(digest, None)
        while len(self._entries) >= self._entries_max:
            del self._entries[next(iter(self._entries))]
        self._entries[digest] = (expires_at_ms, identity)


async def authenticate(key_cache: TenantKeyCache, authorization: str | None) -> TenantIdentity:
    """The tenant owning the `Authorization` header's bearer key (a 401 otherwise), set for the log lines."""
    tenant = await key_cache.tenant_of(bearer_key(authorization))
    tenant_id_var.set(tenant.tenant_id)
    return tenant
