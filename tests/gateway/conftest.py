"""Gateway tests without the broker: a real inference worker (the default model, in-process, on a real
port) and the gateway app on real Postgres, with a recording admission that admits everything (or
refuses what a test tells it to). The full stack with Kafka and the real admission is tests/fixtures/stack.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
import pytest

from gateway.admission.base import AdmissionRequest, Rejection, Reservation
from gateway.api_keys import generate_api_key
from gateway.app import create_app
from gateway.settings import GatewaySettings
from inference.settings import EngineSettings, WorkerSettings
from inference.worker import create_app as create_worker_app
from ledger.events import UsageRecorded
from storage.database import DatabaseSettings, build_async_engine, build_session_factory
from streams.settings import StreamSettings
from streams.topics import LedgerTopics
from tests.fixtures.stack import stack  # noqa: F401  (the e2e stack fixture, module-scoped)
from tests.gateway.servers import FakeStream, FakeWorker, ThreadServer

ADMIN_TOKEN = "gateway-test-admin-token-0123456789"
INTERNAL_TOKEN = "gateway-test-internal-token-0123456789abcdef"  # the gateway <-> worker secret


@dataclass
class RecordingAdmission:
    """Admits everything unless `refuse_with` is set; records every call."""

    admitted: list[AdmissionRequest] = field(default_factory=list)
    finished: list[tuple[str, int]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    refuse_with: Rejection | None = None

    async def admit(self, request: AdmissionRequest) -> Reservation:
        if self.refuse_with is not None:
            raise self.refuse_with
        self.admitted.append(request)
        return Reservation(
            request.request_id,
            request.tenant_id,
            request.estimated_cost,
            0,
            {"x-ratelimit-limit-requests": "100"},
        )

    async def finish(self, reservation: Reservation, actual_cost: int) -> None:
        self.finished.append((reservation.request_id, actual_cost))

    async def release(self, reservation: Reservation) -> None:
        self.released.append(reservation.request_id)

    def settled(self, request_id: str) -> bool:
        return request_id in self.released or any(rid == request_id for rid, _ in self.finished)


@dataclass
class RunningWorker:
    server: ThreadServer
    usage: list[UsageRecorded]

    @property
    def url(self) -> str:
        return self.server.url

    def usage_of(self, request_id: str, timeout_s: float = 10) -> UsageRecorded:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in self.usage:
                if event.event_id == request_id:
                    return event
            time.sleep(0.02)
        raise AssertionError(f"no UsageRecorded for {request_id}")


def start_worker(engine: EngineSettings) -> RunningWorker:
    usage: list[UsageRecorded] = []

    async def emit(event: UsageRecorded) -> None:
        usage.append(event)

    async def build():
        return create_worker_app(
            WorkerSettings(engine=engine), emit_usage=emit, internal_token=INTERNAL_TOKEN
        )

    return RunningWorker(ThreadServer(build).start(), usage)


@dataclass
class RunningFakeWorker:
    server: ThreadServer
    fake: FakeWorker

    @property
    def url(self) -> str:
        return self.server.url


def start_fake_worker(plan=None, internal_token: str = INTERNAL_TOKEN) -> RunningFakeWorker:
    fake = FakeWorker(internal_token, plan)

    async def build():
        return fake

    return RunningFakeWorker(ThreadServer(build).start(), fake)


@pytest.fixture
def fake_worker() -> Iterator[RunningFakeWorker]:
    """A scripted worker: set `fake_worker.fake.plan` to a body -> FakeStream function."""
    running = start_fake_worker(lambda _body: FakeStream())
    yield running
    running.server.stop()


@pytest.fixture(scope="session")
def worker() -> Iterator[RunningWorker]:
    running = start_worker(EngineSettings(device="cpu"))
    yield running
    running.server.stop()


@pytest.fixture(scope="session")
def tiny_queue_worker() -> Iterator[RunningWorker]:
    """One running sequence and one waiting: the third concurrent request finds the queue full."""
    running = start_worker(
        EngineSettings(
            device="cpu",
            running_sequences_max=1,
            waiting_queue_depth_max=1,
            step_tokens_max=256,
            prefill_chunk_tokens_max=256,
        )
    )
    yield running
    running.server.stop()


@dataclass
class TenantKey:
    tenant_id: str
    key: str
    key_id: str


def insert_tenant_with_key(database_url: str, tenant_id: str, tier: str = "pro") -> TenantKey:
    generated = generate_api_key()
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(
            "INSERT INTO tenants (tenant_id, name, tier, created_at_ms) VALUES (%s, %s, %s, 0) ON CONFLICT DO NOTHING",  # noqa: E501
            (tenant_id, tenant_id, tier),
        )
        connection.execute(
            "INSERT INTO api_keys (key_id, tenant_id, prefix, secret_sha256, created_at_ms) VALUES (%s, %s, %s, %s, 0)",  # noqa: E501
            (generated.key_id, tenant_id, generated.prefix, generated.secret_sha256),
        )
    return TenantKey(tenant_id, generated.presented, generated.key_id)


class RecordingLog:
    """The gateway's event log in these tests: records what is published (only the usage of worker streams
    that broke is; nothing here grants or voids, so anything else is a bug). Its tails (the gateway's key
    revocation feed) stay empty: revocations here reach the gateway through the key cache's TTL."""

    def __init__(self) -> None:
        self.published: list[UsageRecorded] = []
        self.topics = LedgerTopics.from_settings(StreamSettings())

    async def tail(self, _topic: str, *, from_beginning: bool, batch_max: int = 1_000):
        await asyncio.Event().wait()  # nothing is ever appended
        yield []

    async def publish(self, event) -> None:
        assert isinstance(event, UsageRecorded), (
            f"only usage is published in the gateway tests, not {event!r}"
        )
        self.published.append(event)

    def usage_of(self, event_id: str, timeout_s: float = 10) -> UsageRecorded:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in self.published:
                if event.event_id == event_id:
                    return event
            time.sleep(0.02)
        raise AssertionError(f"the gateway published no UsageRecorded {event_id}")


@dataclass
class RunningGateway:
    server: ThreadServer
    admission: RecordingAdmission
    settings: GatewaySettings
    log: RecordingLog

    @property
    def url(self) -> str:
        return self.server.url


def start_gateway(
    database_url: str,
    settings: GatewaySettings,
    admission: RecordingAdmission,
    internal_token: str = INTERNAL_TOKEN,
) -> RunningGateway:
    log = RecordingLog()

    async def build():
        database_settings = DatabaseSettings(database_url=database_url, pool_size_max=4, pool_overflow_max=0)
        sessions = build_session_factory(build_async_engine(database_url, database_settings))
        return create_app(
            settings, internal_token=internal_token, log=log, admission=admission, session_factory=sessions
        )

    return RunningGateway(ThreadServer(build).start(), admission, settings, log)


def gateway_settings(worker_urls: list[str], **overrides) -> GatewaySettings:
    values = dict(
        worker_urls=worker_urls,
        admin_token=ADMIN_TOKEN,
        auth_cache_ttl_ms=300,
        worker_connect_timeout_ms=500,
        worker_read_timeout_ms=20_000,
        request_timeout_ms=30_000,
        breaker_failures_max=2,
        breaker_open_ms=60_000,
    )
    values.update(overrides)
    return GatewaySettings(**values)
