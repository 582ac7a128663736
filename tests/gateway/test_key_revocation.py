"""A revoked key stops working on a gateway whose cache held it within a second, not after the cache's
TTL: the admin API announces the revocation on `tenant.keys` and each gateway's feed evicts the key."""

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.auth import KeyRevocationFeed, TenantKeyCache, authenticate
from gateway.errors import ApiError
from streams.embedded_log import PostgresLog
from streams.records import ApiKeyRevoked, LogRecord, encode_revocation
from streams.settings import StreamSettings
from tests.fixtures.admin_api import admin_api, admin_client

pytestmark = pytest.mark.postgres

ADMIN_TOKEN = "revocation-test-admin-token-0123456789"
CACHE_TTL_MS = 60_000  # far longer than the test: only the feed can evict the key in time
REVOKED_WITHIN_MS = 1_000
POLL_INTERVAL_S = 0.01


@pytest.fixture
async def event_log(async_engine) -> AsyncIterator[PostgresLog]:
    log = PostgresLog(async_engine, StreamSettings(topic_partitions=2))
    await log.start()
    yield log
    await log.stop()


@pytest.fixture
async def admin(session_factory, event_log) -> AsyncIterator[httpx.AsyncClient]:
    async with admin_client(admin_api(session_factory, event_log, ADMIN_TOKEN), ADMIN_TOKEN) as client:
        yield client


async def issued_key(admin) -> tuple[str, str, str]:
    """(tenant id, key id, the key) of a new tenant's new key."""
    tenant = await admin.post("/admin/v1/tenants", json={"name": "Acme", "tier": "pro"})
    key = await admin.post(f"/admin/v1/tenants/{tenant.json()['tenant_id']}/keys")
    assert key.status_code == 201, key.text
    return tenant.json()["tenant_id"], key.json()["key_id"], key.json()["key"]


async def refused_after_ms(key_cache: TenantKeyCache, key: str, started: float) -> float | None:
    """Milliseconds from `started` until the key is refused, or None if it still works after the limit."""
    while (elapsed_ms := (time.monotonic() - started) * 1000) < REVOKED_WITHIN_MS:
        try:
            await authenticate(key_cache, f"Bearer {key}")
        except ApiError as error:
            assert error.status_code == 401
            return elapsed_ms
        await asyncio.sleep(POLL_INTERVAL_S)
    return None


async def test_a_revoked_key_is_refused_within_a_second_on_a_gateway_that_cached_it(
    admin, session_factory, event_log
):
    tenant_id, key_id, key = await issued_key(admin)
    key_cache = TenantKeyCache(session_factory, ttl_ms=CACHE_TTL_MS, entries_max=100)
    feed = KeyRevocationFeed(event_log, key_cache)
    await feed.start()
    try:
        assert (await authenticate(key_cache, f"Bearer {key}")).tenant_id == tenant_id  # now cached
        revoked = await admin.delete(f"/admin/v1/keys/{key_id}")
        assert revoked.status_code == 200, revoked.text

        assert await refused_after_ms(key_cache, key, time.monotonic()) is not None
    finally:
        await feed.stop()


async def test_without_the_feed_the_cached_key_outlives_its_revocation(admin, session_factory):
    """What the feed fixes: the cache alone keeps answering for the TTL."""
    tenant_id, key_id, key = await issued_key(admin)
    key_cache = TenantKeyCache(session_factory, ttl_ms=CACHE_TTL_MS, entries_max=100)
    await authenticate(key_cache, f"Bearer {key}")

    await admin.delete(f"/admin/v1/keys/{key_id}")

    assert await refused_after_ms(key_cache, key, time.monotonic()) is None


async def test_revoke_announces_on_tenant_keys_keyed_by_key_id(admin, event_log):
    tenant_id, key_id, _ = await issued_key(admin)
    first = await admin.delete(f"/admin/v1/keys/{key_id}")
    again = await admin.delete(f"/admin/v1/keys/{key_id}")  # a retry announces the same revocation

    records = [
        record
        for partition in range(event_log.partitions)
        for record in await event_log.read(event_log.topics.keys, partition, 0, 10)
    ]
    expected = ApiKeyRevoked(key_id=key_id, tenant_id=tenant_id, revoked_at=first.json()["revoked_at"])
    assert again.json() == first.json()
    assert [(record.key, record.value) for record in records] == [
        (key_id.encode(), encode_revocation(expected))
    ] * 2


async def test_a_lookup_in_flight_during_a_revocation_is_not_cached(admin, session_factory):
    """The database answered before the revocation, the eviction came while the answer was on its way:
    the answer is returned once but not kept."""
    _, key_id, key = await issued_key(admin)
    key_cache = TenantKeyCache(session_factory, ttl_ms=CACHE_TTL_MS, entries_max=100)
    real_lookup = key_cache._lookup

    async def lookup_then_revoked(presented_key):
        answer = await real_lookup(presented_key)
        await admin.delete(f"/admin/v1/keys/{key_id}")
        key_cache.evict_key(key_id)  # what the feed does when the revocation arrives
        return answer

    key_cache._lookup = lookup_then_revoked
    await authenticate(key_cache, f"Bearer {key}")
    key_cache._lookup = real_lookup

    with pytest.raises(ApiError):
        await authenticate(key_cache, f"Bearer {key}")


async def test_the_feed_skips_records_that_are_not_revocations(session_factory, event_log):
    key_cache = TenantKeyCache(session_factory, ttl_ms=CACHE_TTL_MS, entries_max=100)
    feed = KeyRevocationFeed(event_log, key_cache)
    revocation = encode_revocation(ApiKeyRevoked(key_id="key_1", tenant_id="t1", revoked_at=1))

    feed.apply(
        [
            LogRecord(event_log.topics.keys, 0, 0, b"key_0", b"{not json"),
            LogRecord(event_log.topics.keys, 0, 1, b"key_1", None),
            LogRecord(event_log.topics.keys, 0, 2, b"key_1", revocation),
        ]
    )

    assert key_cache._evictions == 1


@pytest.mark.kafka
async def test_a_revoked_key_is_refused_within_a_second_over_kafka(
    session_factory, kafka_broker, topic_prefix, tmp_path
):
    from streams.log import KafkaLog
    from tests.streams.helpers import create_ledger_topics, stream_settings

    settings = stream_settings(kafka_broker.bootstrap, topic_prefix, tmp_path)
    await create_ledger_topics(settings)
    log = KafkaLog(settings)
    await log.start()
    app = admin_api(session_factory, log, ADMIN_TOKEN)
    key_cache = TenantKeyCache(session_factory, ttl_ms=CACHE_TTL_MS, entries_max=100)
    feed = KeyRevocationFeed(log, key_cache)
    await feed.start()
    try:
        async with admin_client(app, ADMIN_TOKEN) as admin:
            tenant_id, key_id, key = await issued_key(admin)
            assert (await authenticate(key_cache, f"Bearer {key}")).tenant_id == tenant_id
            revoked = await admin.delete(f"/admin/v1/keys/{key_id}")
            assert revoked.status_code == 200, revoked.text

            assert await refused_after_ms(key_cache, key, time.monotonic()) is not None
    finally:
        await feed.stop()
        await log.stop()
