"""The webhook dispatcher under test: a real local HTTP receiver that verifies every request with the
`standardwebhooks` package, the embedded log on a fresh real database, tenants and endpoints, alerts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import socket
from collections import Counter
from dataclasses import dataclass, field

import pytest
import uvicorn
from sqlalchemy import select
from standardwebhooks import Webhook, WebhookVerificationError

from ledger.alerts import AlertFired, alert_id_of, encode_alert
from storage.database import build_async_engine, build_session_factory
from storage.tenants import Tenant
from storage.webhooks import WebhookDelivery, WebhookEndpoint
from streams.embedded_log import PostgresLog
from streams.webhooks.dispatcher import WebhookDispatcher
from streams.webhooks.settings import WebhookSettings
from tests.streams.helpers import stream_settings

WAIT_S = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@dataclass
class Receiver:
    """An HTTP endpoint on a free port. `status` is what it answers; `delay_s` how long it takes. Every
    request is verified with Webhook(secret).verify; a request that fails verification is answered 400
    and counted in `unverified`. `delivered` counts the 2xx answers per webhook-id. `verified_with`
    counts, for `secret` and each of `also_held` (receivers holding only that secret), the requests
    Webhook(that secret).verify accepts; `signatures` keeps each request's webhook-signature header."""

    secret: str
    status: int = 204
    delay_s: float = 0.0
    port: int = field(default_factory=free_port)
    requests: list[tuple[str, dict]] = field(default_factory=list)  # (webhook-id, body) of verified ones
    delivered: Counter = field(default_factory=Counter)
    unverified: int = 0
    also_held: list[str] = field(default_factory=list)
    verified_with: Counter = field(default_factory=Counter)
    signatures: list[str] = field(default_factory=list)
    in_flight: int = 0
    in_flight_peak: int = 0
    _server: uvicorn.Server | None = None
    _task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def __call__(self, scope, receive, send) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the sender went away mid-request (a dispatcher killed -9): nothing was delivered
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {name.decode(): value.decode() for name, value in scope["headers"]}
        self.signatures.append(headers.get("webhook-signature", ""))
        for secret in dict.fromkeys([self.secret, *self.also_held]):
            with contextlib.suppress(WebhookVerificationError):
                Webhook(secret).verify(body, headers)
                self.verified_with[secret] += 1
        self.in_flight += 1
        self.in_flight_peak = max(self.in_flight_peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            status = self.status
            try:
                payload = Webhook(self.secret).verify(body, headers)
            except WebhookVerificationError:
                self.unverified += 1
                status = 400
            else:
                self.requests.append((headers["webhook-id"], payload))
                if 200 <= status < 300:
                    self.delivered[headers["webhook-id"]] += 1
        finally:
            self.in_flight -= 1
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def start(self) -> None:
        config = uvicorn.Config(self, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # uvicorn < 0.29
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            await self._task
            self._server = self._task = None


@pytest.fixture
async def receivers():
    started: list[Receiver] = []

    async def make(secret: str | None = None, **options) -> Receiver:
        receiver = Receiver(secret=secret or new_secret(), **options)
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        await receiver.stop()


@pytest.fixture
async def database(database_url, database_settings):
    engine = build_async_engine(database_url, database_settings)
    yield engine, build_session_factory(engine)
    await engine.dispose()


@pytest.fixture
async def event_log(database, topic_prefix, tmp_path):
    engine, _ = database
    log = PostgresLog(engine, stream_settings("unused:9092", topic_prefix, tmp_path))
    await log.start()
    yield log
    await log.stop()


@pytest.fixture
def sessions(database):
    return database[1]


def fast_settings(**overrides) -> WebhookSettings:
    values = dict(
        first_retry_delay_ms=50,
        retry_delay_max_ms=200,
        give_up_after_ms=60_000,
        request_timeout_ms=2_000,
        poll_interval_ms=20,
        in_flight_deliveries_max=16,
        endpoint_in_flight_max=4,
    )
    values.update(overrides)
    return WebhookSettings(**values)


async def add_tenant(sessions, tenant_id: str) -> str:
    async with sessions() as session, session.begin():
        session.add(Tenant(tenant_id=tenant_id, name=tenant_id, tier="pro", created_at_ms=0))
    return tenant_id


async def add_endpoint(
    sessions, tenant_id: str, receiver: Receiver, endpoint_id: str, kinds: list[str] | None = None
) -> str:
    async with sessions() as session, session.begin():
        session.add(
            WebhookEndpoint(
                endpoint_id=endpoint_id,
                tenant_id=tenant_id,
                url=receiver.url,
                description="",
                alert_kinds=kinds,
                secret=receiver.secret,
                enabled=True,
                created_at_ms=0,
            )
        )
    return endpoint_id


def alert(tenant_id: str, crossing: int, *, rule_id: str = "low", kind: str = "balance_below") -> AlertFired:
    return AlertFired(
        alert_id=alert_id_of(tenant_id, rule_id, crossing),
        tenant_id=tenant_id,
        rule_id=rule_id,
        kind=kind,
        crossing=crossing,
        fired_at=1_700_000_000_000 + crossing,
        balance=100 - crossing,
        threshold=1_000,
    )


async def produce(event_log, alerts: list[AlertFired]) -> None:
    for item in alerts:
        await event_log.append(event_log.topics.alerts, item.tenant_id.encode(), encode_alert(item))


async def run_until(dispatcher: WebhookDispatcher, done, timeout_s: float = WAIT_S) -> None:
    """Run the dispatcher until `await done()` holds, then stop it."""
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        async with asyncio.timeout(timeout_s):
            while not await done():
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await task


def body_json(text: str) -> dict:
    return json.loads(text)


async def states(sessions) -> dict[tuple[str, str], str]:
    """{(endpoint id, alert id): state} of every delivery."""
    async with sessions() as session:
        rows = await session.execute(
            select(WebhookDelivery.endpoint_id, WebhookDelivery.alert_id, WebhookDelivery.state)
        )
    return {(endpoint_id, alert_id): state for endpoint_id, alert_id, state in rows}


def all_in(expected: set, state: str, sessions):
    async def check() -> bool:
        found = await states(sessions)
        return all(found.get(key) == state for key in expected)

    return check
