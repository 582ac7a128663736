"""The webhook dispatcher: ledger.alerts -> Postgres (what to deliver) -> POSTs -> Postgres (what happened).

Two loops in one task, each a bounded step:

    consume   read each partition of ledger.alerts from this consumer's offsets (stored in Postgres,
              projector_offsets under `consumer_name`: its own consumer group, over the embedded log or
              Kafka alike, through the streams.log contract); for every alert, one delivery row per
              enabled endpoint of THE ALERT'S TENANT that wants its kind; the rows and the next offsets
              are written in ONE transaction. An offset therefore advances only once its alert's
              deliveries are scheduled, and a redelivered or replayed alert finds its rows (the key is
              (endpoint, alert id)) and schedules nothing.
    deliver   lease the due deliveries (storage.webhooks.claim_due: at most `endpoint_in_flight_max` per
              endpoint, `in_flight_deliveries_max` in all), POST each in its own task with a timeout, then
              record the attempt and the delivery's next state (delivered, pending until the next retry,
              or dead) in one transaction. A slow or dead endpoint holds at most its own share of the
              requests in flight; the others keep going.

Restart: nothing lives only in memory. Pending retries are rows with their next attempt time; a request in
flight when the process died is leased for `request_timeout_ms` + a margin, then claimed again. A delivered
row is never claimed again, so no alert is delivered twice by a dispatcher's choice; a crash after the
receiver answered 2xx and before the row was written sends it once more, with the same `webhook-id`
(Standard Webhooks receivers drop repeats by it).

Dead letters: an alert that does not decode goes to ledger.dlq (streams.records.DeadLetter) and its offset
advances; a delivery that gives up goes there too (source = the alert's topic, partition and offset; value =
the message body), appended before its row is committed (at least once, like every dead letter).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence

import httpx
import msgspec
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ledger.alerts import AlertFired, decode_alert
from ledger.events import InvalidEvent
from storage.database import DatabaseSettings
from storage.projections import stored_offsets
from storage.webhooks import (
    DEAD,
    PENDING,
    Claimed,
    Outcome,
    WebhookEndpoint,
    claim_due,
    enabled_endpoints,
    forget_expired_secrets,
    next_due_ms,
    prune_attempts,
    record_attempt,
    schedule,
)
from streams.log import EventLog, append_mark, idle_until_appended
from streams.projector import dead_letter
from streams.records import DeadLetter, LogRecord
from streams.service import run_until_signalled, with_database_and_log
from streams.settings import StreamSettings
from streams.spool import OutgoingRecord
from streams.webhooks.message import (
    ERROR_CHARS_MAX,
    after_attempt,
    body_of,
    event_type,
    is_success,
    signed_headers,
)
from streams.webhooks.settings import WebhookSettings

log = logging.getLogger(__name__)

PRUNE_INTERVAL_MS = 3_600_000  # between prunes of the delivery log
PRUNE_BATCH_MAX = 10_000  # attempts deleted by one prune


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def wants(endpoint: WebhookEndpoint, alert: AlertFired) -> bool:
    """Tenant isolation first: an endpoint only ever gets its own tenant's alerts."""
    if endpoint.tenant_id != alert.tenant_id:
        return False
    return endpoint.alert_kinds is None or alert.kind in endpoint.alert_kinds


class WebhookDispatcher:
    def __init__(
        self,
        event_log: EventLog,
        session_factory: async_sessionmaker[AsyncSession],
        settings: WebhookSettings,
        *,
        clock_ms: Callable[[], int] = wall_clock_ms,
        jitter: Callable[[], float] = random.random,  # uniform in [0, 1): the full jitter's fraction
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.log = event_log
        self.sessions = session_factory
        self.settings = settings
        self.clock_ms = clock_ms
        self.jitter = jitter
        self._client = client
        self._owns_client = client is None
        self._in_flight: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self.attempts_made = 0
        self._next_prune_ms = 0

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.settings.request_timeout_ms / 1000,
                follow_redirects=False,  # a 3xx is a failure: the endpoint's URL is the one registered
                trust_env=False,  # no proxy from the environment between us and tenants' endpoints
                limits=httpx.Limits(max_connections=self.settings.in_flight_deliveries_max),
            )
        return self._client

    async def close(self) -> None:
        """Wait for the requests in flight (each bounded by its timeout), then close the client."""
        await self.drain()
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def drain(self) -> None:
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)

    # ---- consume ---------------------------------------------------------------------------------------

    async def consume_step(self) -> int:
        """Schedule the deliveries of at most `alert_batch_max` alerts per partition; the records read."""
        topic = self.log.topics.alerts
        async with self.sessions() as session:
            offsets = await stored_offsets(session, self.settings.consumer_name)
        records: list[LogRecord] = []
        for partition in range(self.log.partitions):
            start = offsets.get((topic, partition), 0)
            if await self.log.end_offset(topic, partition) <= start:
                continue
            records += await self.log.read(topic, partition, start, self.settings.alert_batch_max)
        if records:
            await self._schedule(records)
        return len(records)

    async def _schedule(self, records: Sequence[LogRecord]) -> None:
        now = self.clock_ms()
        alerts: list[tuple[LogRecord, AlertFired]] = []
        rejected: list[OutgoingRecord] = []
        for record in records:
            try:
                alerts.append((record, decode_alert(record.value or b"")))
            except InvalidEvent as error:
                rejected.append(dead_letter(self.log.topics, record, str(error)))
        next_offsets: dict[tuple[str, int], int] = {}
        for record in records:
            key = (record.topic, record.partition)
            next_offsets[key] = max(next_offsets.get(key, 0), record.offset + 1)
        async with self.sessions() as session, session.begin():
            endpoints = await enabled_endpoints(session, {alert.tenant_id for _, alert in alerts})
            rows = [
                self._delivery_row(record, alert, endpoint, now)
                for record, alert in alerts
                for endpoint in endpoints
                if wants(endpoint, alert)
            ]
            if rejected:
                await self.log.append_many(rejected)  # before the offsets commit: at least once
            await schedule(session, rows, self.settings.consumer_name, next_offsets)
        if rows:
            self._wake.set()
        log.debug("scheduled %d deliveries of %d alerts", len(rows), len(alerts))

    @staticmethod
    def _delivery_row(record: LogRecord, alert: AlertFired, endpoint: WebhookEndpoint, now: int) -> dict:
        return {
            "endpoint_id": endpoint.endpoint_id,
            "alert_id": alert.alert_id,
            "tenant_id": alert.tenant_id,
            "event_type": event_type(alert),
            "body": body_of(alert),
            "state": PENDING,
            "attempts": 0,
            "alert_partition": record.partition,
            "alert_offset": record.offset,
            "scheduled_at_ms": now,
            "next_attempt_at_ms": now,
        }

    # ---- deliver ---------------------------------------------------------------------------------------

    async def deliver_step(self) -> int:
        """Lease the due deliveries there is room for and start their attempts; how many it started."""
        room = self.settings.in_flight_deliveries_max - len(self._in_flight)
        if room <= 0:
            return 0
        async with self.sessions() as session, session.begin():
            claimed = await claim_due(
                session, self.clock_ms(), self.settings.lease_ms, room, self.settings.endpoint_in_flight_max
            )
        for delivery in claimed:
            task = asyncio.create_task(self._attempt(delivery), name=f"webhook {delivery.endpoint_id}")
            self._in_flight.add(task)
            task.add_done_callback(self._finished)
        assert len(self._in_flight) <= self.settings.in_flight_deliveries_max, "in flight above the limit"
        return len(claimed)

    def _finished(self, task: asyncio.Task) -> None:
        self._in_flight.discard(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            # the database or the log away: the lease runs out and the delivery is claimed again
            log.warning("webhook attempt not recorded: %r", task.exception())

    async def _attempt(self, delivery: Claimed) -> None:
        started = self.clock_ms()
        status_code, error = await self._post(delivery, started)
        now = self.clock_ms()
        succeeded = status_code is not None and is_success(status_code)
        if not delivery.enabled:
            state, next_at = DEAD, None
        else:
            state, next_at = after_attempt(
                succeeded, delivery.attempts + 1, delivery.scheduled_at_ms, now, self.settings, self.jitter()
            )
        outcome = Outcome(
            at_ms=started,
            status_code=status_code,
            error=error,
            latency_ms=max(0, now - started),
            state=state,
            next_attempt_at_ms=next_at,
        )
        async with self.sessions() as session, session.begin():
            if await record_attempt(session, delivery, outcome) and state == DEAD:
                await self.log.append_many([self._dead_letter(delivery, outcome)])
        self.attempts_made += 1

    async def _post(self, delivery: Claimed, now_ms: int) -> tuple[int | None, str | None]:
        """(HTTP status, None) or (None, the error); never raises for the endpoint's faults."""
        if not delivery.enabled:
            return None, "endpoint disabled"
        headers = signed_headers(delivery.signing_secrets(now_ms), delivery.alert_id, delivery.body, now_ms)
        timeout_s = self.settings.request_timeout_ms / 1000
        try:
            # the whole request within the timeout (httpx's own bounds each phase); the response's body is
            # never read: the status says it all, and an endpoint cannot make us hold a large body
            async with asyncio.timeout(timeout_s):
                request = self.client.stream(
                    "POST", delivery.url, content=delivery.body.encode(), headers=headers
                )
                async with request as response:
                    return response.status_code, None
        except TimeoutError:
            return None, f"timed out after {self.settings.request_timeout_ms} ms"
        except (httpx.HTTPError, httpx.InvalidURL) as failure:
            return None, f"{type(failure).__name__}: {failure}"[:ERROR_CHARS_MAX]

    def _dead_letter(self, delivery: Claimed, outcome: Outcome) -> OutgoingRecord:
        last = outcome.error if outcome.error is not None else f"HTTP {outcome.status_code}"
        letter = DeadLetter(
            reason=(
                f"webhook endpoint {delivery.endpoint_id}: gave up after {delivery.attempts + 1} attempts "
                f"({outcome.at_ms - delivery.scheduled_at_ms} ms); last: {last}"
            ),
            source_topic=self.log.topics.alerts,
            partition=delivery.alert_partition,
            offset=delivery.alert_offset,
            timestamp_ms=outcome.at_ms,
            key=delivery.tenant_id.encode(),
            value=delivery.body.encode(),
        )
        return OutgoingRecord(self.log.topics.dlq, delivery.tenant_id.encode(), msgspec.json.encode(letter))

    # ---- the loop --------------------------------------------------------------------------------------

    async def step(self) -> int:
        await self.prune_when_due()
        return await self.consume_step() + await self.deliver_step()

    async def prune_when_due(self) -> int:
        """Every PRUNE_INTERVAL_MS, delete attempts past `delivery_log_retention_ms` (one bounded batch;
        returns how many) and erase the previous secrets whose overlap has ended."""
        now = self.clock_ms()
        if now < self._next_prune_ms:
            return 0
        self._next_prune_ms = now + PRUNE_INTERVAL_MS
        async with self.sessions() as session, session.begin():
            await forget_expired_secrets(session, now)
            return await prune_attempts(
                session, now - self.settings.delivery_log_retention_ms, PRUNE_BATCH_MAX
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Consume and deliver until `stop` is set; then wait for the requests in flight."""
        try:
            topics = [self.log.topics.alerts]
            while not stop.is_set():
                self._wake.clear()
                mark = append_mark(self.log, topics)  # before reading: an append after it ends the idle wait
                if await self.step():
                    continue
                await self._idle(stop, topics, mark)
        finally:
            await self.close()

    async def _idle(self, stop: asyncio.Event, topics: list[str], mark: int | None) -> None:
        """Until `stop`, a request finishes, something was scheduled, a new alert (the embedded log wakes
        it on an append; over Kafka: `poll_interval_ms`), or the earliest pending delivery comes due
        (`idle_recheck_ms` at the longest)."""
        async with self.sessions() as session:
            due = await next_due_ms(session)
        longest_ms = self.settings.poll_interval_ms if mark is None else self.settings.idle_recheck_ms
        now = self.clock_ms()
        if due is None:
            wait_ms = longest_ms
        elif due > now:
            wait_ms = min(longest_ms, due - now)
        else:  # due and not claimed: held back by the in-flight limits (a finishing request wakes this wait),
            wait_ms = min(longest_ms, self.settings.poll_interval_ms)  # or it came due since: never a spin
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        if mark is not None:
            waiters.append(
                asyncio.ensure_future(idle_until_appended(self.log, topics, mark, stop, 0, wait_ms / 1000))
            )
        try:
            await asyncio.wait(waiters, timeout=wait_ms / 1000, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


async def run_webhook_dispatcher(
    database_settings: DatabaseSettings,
    stream_settings: StreamSettings,
    settings: WebhookSettings,
    stop: asyncio.Event,
) -> None:
    """The distributed deployment's dispatcher: wait for and migrate the database, create missing topics,
    then deliver over Kafka until `stop` is set."""

    async def deliver(event_log: EventLog, sessions: async_sessionmaker[AsyncSession]) -> None:
        await WebhookDispatcher(event_log, sessions, settings).run(stop)

    await with_database_and_log(database_settings, stream_settings, deliver)


def main() -> None:
    """`python -m streams.webhooks` (or `tollgate webhooks dispatch`): until SIGINT or SIGTERM."""
    run_until_signalled(
        lambda stop: run_webhook_dispatcher(DatabaseSettings(), StreamSettings(), WebhookSettings(), stop)
    )
