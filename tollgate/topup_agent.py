"""The auto top-up agent: `ledger.alerts` (kind top_up) -> a grant through the admin API's command path.

For each top-up alert the fold published (ledger.rules decided it: the balance fell below the rule's
threshold inside its monthly caps), the agent grants `top_up_amount` on the alert's terms (category, price,
currency) with `gateway.admin.commands.grant_credit`, the command behind POST /admin/v1/tenants/{id}/grants:
recorded in Postgres, published as CreditGranted, marked published. Its Idempotency-Key is derived from the
rule and the crossing (`top-up:{rule}:{crossing}`), so the grant id and event id are too
(commands.grant_identity): a crash between any two steps, a redelivered alert, or two agents at once, find
the same grant (its row, under the tenant's lock) and never grant twice; the fold treats a repeated
CreditGranted with the same terms as a no-op.

The grant is effective at the alert's `fired_at` (the stream time at which the balance crossed) and says
where it came from: category and price from the rule, reference `top-up rule {rule}, crossing {n}`, so it
shows in the entries and statements like any grant with that reference.

Offsets: this consumer's next offsets per partition of ledger.alerts are rows of projector_offsets under
CONSUMER_NAME, written only after every grant of the records before them was acknowledged by the event log
(at least once, made exactly once by the key). Over Kafka or the embedded log alike (streams.log contract).
An alert that does not decode, or a grant the command refuses (the tenant is gone, an amount above
TOLLGATE_ADMIN_GRANT_AMOUNT_MAX), is logged and skipped; an event log that does not accept the grant (503)
stops the step, which is retried from the same offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.admin import commands
from gateway.admin.errors import AdminError
from gateway.admin.models import GrantCreate
from gateway.admin.publisher import EventPublisher
from gateway.admin.settings import AdminSettings
from ledger.alerts import AlertFired, decode_alert
from ledger.events import InvalidEvent
from storage.database import DatabaseSettings
from storage.projections import stored_offsets, write_offsets
from storage.tenants import Grant
from streams.log import EventLog, append_mark, idle_until_appended
from streams.records import LogRecord
from streams.service import run_until_signalled, with_database_and_log
from streams.settings import StreamSettings

log = logging.getLogger(__name__)

CONSUMER_NAME = "topup-agent"  # its offsets in projector_offsets
ALERT_BATCH_MAX = 100  # alerts read from one partition in one step
POLL_INTERVAL_MS = 500  # between steps that found nothing (Kafka)
IDLE_RECHECK_MS = 60_000  # the longest idle wait on a log that wakes on appends (the embedded one)
RETRY_DELAY_MS = 1_000  # after a step the event log or the database failed


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def idempotency_key(alert: AlertFired) -> str:
    """The grant's Idempotency-Key: one per rule and crossing (grant_identity adds the tenant)."""
    return f"top-up:{alert.rule_id}:{alert.crossing}"


def top_up_request(alert: AlertFired) -> GrantCreate:
    """The grant a top-up alert asks for."""
    assert alert.kind == "top_up" and alert.top_up_amount, f"not a top-up: {alert.alert_id}"
    return GrantCreate(
        amount=alert.top_up_amount,
        effective_at=alert.fired_at,
        category=alert.top_up_category or "promotional",
        price=alert.top_up_price,
        currency=alert.top_up_currency,
        reference=f"top-up rule {alert.rule_id}, crossing {alert.crossing}",
    )


class TopUpAgent:
    """Consumes ledger.alerts from its stored offsets and grants the top-ups. `publisher`: where the grants
    are published (default: the event log itself)."""

    def __init__(
        self,
        event_log: EventLog,
        sessions: async_sessionmaker[AsyncSession],
        admin_settings: AdminSettings,
        *,
        publisher: EventPublisher | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
        consumer_name: str = CONSUMER_NAME,
    ) -> None:
        self.log = event_log
        self.sessions = sessions
        self.admin_settings = admin_settings
        self.publisher = publisher if publisher is not None else event_log
        self.clock_ms = clock_ms
        self.consumer_name = consumer_name
        self.granted = 0  # top-ups this agent granted (new grants, not repeats)
        self._next_offsets: dict[int, int] | None = None  # as stored; read once, then kept as it commits

    async def step(self) -> int:
        """Handle at most ALERT_BATCH_MAX alerts per partition; the records read."""
        topic = self.log.topics.alerts
        if self._next_offsets is None:
            self._next_offsets = await self._offsets(topic)
        offsets = self._next_offsets
        handled = 0
        for partition in range(self.log.partitions):
            start = offsets.get(partition, 0)
            if await self.log.end_offset(topic, partition) <= start:
                continue
            records = await self.log.read(topic, partition, start, ALERT_BATCH_MAX)
            for record in records:
                await self.handle(record)
            if records:
                await self._commit(topic, partition, records[-1].offset + 1)  # every grant acknowledged
                offsets[partition] = records[-1].offset + 1
                handled += len(records)
        return handled

    async def handle(self, record: LogRecord) -> Grant | None:
        """Grant the top-up a record asks for (None: not a top-up, or refused and skipped)."""
        try:
            alert = decode_alert(record.value or b"")
        except InvalidEvent as error:
            log.warning("alerts[%d]@%d: skipped, %s", record.partition, record.offset, error.reason)
            return None
        if alert.kind != "top_up":
            return None
        try:
            grant, created = await commands.grant_credit(
                self.sessions,
                self.publisher,
                self.admin_settings,
                self.clock_ms,
                alert.tenant_id,
                idempotency_key(alert),
                top_up_request(alert),
            )
        except AdminError as refused:
            log.error("top-up %s not granted: %s", alert.alert_id, refused.detail)
            return None
        if created:
            self.granted += 1
            log.info("top-up %s granted: %s (%d credits)", alert.alert_id, grant.grant_id, grant.amount)
        return grant

    async def run(self, stop: asyncio.Event) -> None:
        topics = [self.log.topics.alerts]
        while not stop.is_set():
            mark = append_mark(self.log, topics)  # before reading: an append after it ends the idle wait
            try:
                found = await self.step()
            except Exception:  # the event log or the database: retried from the stored offsets
                log.exception("top-up step failed; retrying in %d ms", RETRY_DELAY_MS)
                self._next_offsets, found = None, 0
                await _wait(stop, RETRY_DELAY_MS)
            if not found:
                await idle_until_appended(
                    self.log, topics, mark, stop, POLL_INTERVAL_MS / 1000, IDLE_RECHECK_MS / 1000
                )

    async def _offsets(self, topic: str) -> dict[int, int]:
        async with self.sessions() as session:
            stored = await stored_offsets(session, self.consumer_name)
        return {partition: offset for (name, partition), offset in stored.items() if name == topic}

    async def _commit(self, topic: str, partition: int, next_offset: int) -> None:
        async with self.sessions() as session, session.begin():
            await write_offsets(session, self.consumer_name, {(topic, partition): next_offset})


async def _wait(stop: asyncio.Event, ms: int) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), ms / 1000)


async def run_top_up_agent(
    database_settings: DatabaseSettings, stream_settings: StreamSettings, stop: asyncio.Event
) -> None:
    """The distributed deployment's agent: wait for and migrate the database, create missing topics, then
    grant top-ups over Kafka until `stop` is set."""

    async def grant(event_log: EventLog, sessions: async_sessionmaker[AsyncSession]) -> None:
        await TopUpAgent(event_log, sessions, AdminSettings()).run(stop)

    await with_database_and_log(database_settings, stream_settings, grant)


def main() -> None:
    """`python -m tollgate.topup_agent` (or `tollgate top-up agent`): until SIGINT or SIGTERM."""
    run_until_signalled(lambda stop: run_top_up_agent(DatabaseSettings(), StreamSettings(), stop))


if __name__ == "__main__":
    main()
