"""The balance view: each tenant's latest balance, and which admitted requests the balance already includes.

Sources, read through the `streams.log.EventLog` contract (Kafka or the embedded Postgres log alike):
    ledger.balances  from the beginning (compacted: latest `streams.records.BalanceRecord` per tenant);
                     readiness = caught up with the ends this topic had when the view started
    ledger.events    from the end; only the `UsageRecorded` of requests this process watches are
                     decoded (their key, the tenant id, is checked first), to learn their source offset

The events tail starts at the end of the log, and is started before the balances tail whose first
pass makes the view ready for admissions, so it is in place before any request is admitted. Were it
not, a usage appended before it got there would never be seen: its hold would wait for
settle_timeout_ms instead (conservative).

When is a request's usage in the balance? A balance record carries `applied_offset`, the highest source
offset on `ledger.events` folded into it. The usage of request R is in a balance exactly when that
balance's applied_offset >= the offset of R's UsageRecorded. So the view learns R's offset from
ledger.events and reports R as folded when both are known and the offset test holds, in whichever
order the two tails deliver them. (The `usage_allocated` entry on ledger.entries says R was folded
but not which balance record includes it: entries and balances are separate topics read by separate
consumers, and the first balance to arrive after the entry may be an older one. Dropping a hold on the
entry would count R neither in the balance nor in the holds for a moment, so this view does not use it.)

Expiring credit: a balance is computed at `as_of` (the fold's stream time), and the processor publishes
a block's forfeit only after its grace period. The record lists its expiring blocks as
(expires_at, remaining), so `PublishedBalance.spendable_at(now)` stops counting a block at its expiry.
That is conservative: usage after as_of that drew on the block is also held, and counted twice.

Staleness: every `view_lag_check_interval_ms` the feed reads the end offsets of both topics. The view
is "caught up at t" once it has read the balances topic up to the ends read at t; staleness is now - t.
Lag metrics: unread records of ledger.balances, and records of ledger.events no balance in the view
includes yet (the processor's lag plus ours).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from gateway.admission.metrics import AdmissionMetrics, default_metrics
from gateway.admission.settings import AdmissionSettings
from ledger.codec import decode_event
from ledger.events import InvalidEvent, UsageRecorded
from streams.log import EventLog, LogRecord
from streams.records import BalanceRecord
from streams.topics import LedgerTopics

logger = logging.getLogger(__name__)

CAUGHT_UP_TARGETS_MAX = 64  # end-offset snapshots waiting to be reached; the oldest is dropped beyond
TAIL_RESTART_BACKOFF_MS = 1_000
STOP_TIMEOUT_MS = 5_000

_balance_decoder = msgspec.json.Decoder(BalanceRecord)


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class PublishedBalance:
    tenant_id: str
    balance: int  # credit left at as_of_ms
    overage: int
    as_of_ms: int
    applied_offset: int  # highest ledger.events offset (of the tenant's partition) folded in
    expiring: tuple[tuple[int, int], ...] = ()  # (expires_at_ms, remaining) of blocks in `balance`
    # (models, expires_at_ms, remaining) of the blocks in `balance` scoped to models; empty for most tenants
    scoped: tuple[tuple[tuple[str, ...], int | None, int], ...] = ()

    def spendable_at(self, now_ms: int) -> int:
        """The balance without the blocks that have expired by now_ms (their forfeit may not be out yet)."""
        expired = sum(remaining for expires_at_ms, remaining in self.expiring if expires_at_ms <= now_ms)
        return self.balance - expired

    def spendable_for(self, model: str, now_ms: int) -> int:
        """What a request of `model` may spend now: the spendable balance less the unexpired credit scoped
        to other models (ledger.scoped: unscoped credit plus the scopes that name the model)."""
        spendable = self.spendable_at(now_ms)
        for models, expires_at_ms, remaining in self.scoped:
            if model not in models and (expires_at_ms is None or expires_at_ms > now_ms):
                spendable -= remaining
        return spendable

    @classmethod
    def from_record(cls, record: BalanceRecord) -> PublishedBalance:
        return cls(
            tenant_id=record.tenant_id,
            balance=record.balance,
            overage=record.overage,
            as_of_ms=record.as_of,
            applied_offset=record.applied_offset,
            expiring=tuple((int(e), int(r)) for e, r in record.expiring),
            scoped=tuple((tuple(m), e, int(r)) for m, e, r in record.scoped),
        )


# tenant_id, request_id, and the balance that includes the request's usage
FoldedListener = Callable[[str, str, PublishedBalance], None]


class LedgerView:
    """The in-memory view. Fed by `LedgerViewFeed` (or directly, in tests); one event loop, no threads."""

    def __init__(
        self, topics: LedgerTopics, partitions: int, *, metrics: AdmissionMetrics | None = None
    ) -> None:
        assert partitions >= 1, f"partitions must be >= 1, got {partitions}"
        self.topics = topics
        self.partitions = partitions
        self.metrics = metrics or default_metrics()
        self.ready = asyncio.Event()
        self.caught_up_at_ms: int | None = None
        self._balances: dict[str, PublishedBalance] = {}
        self._watched: dict[bytes, dict[str, int | None]] = {}  # tenant key -> request id -> usage offset
        self._listeners: list[FoldedListener] = []
        self._balance_positions = dict.fromkeys(range(partitions), 0)  # next offset to read
        self._applied_by_partition = dict.fromkeys(range(partitions), -1)
        self._targets: deque[tuple[int, dict[int, int]]] = deque()

    # ------------------------------------------------------------------------------------ reading

    def balance(self, tenant_id: str) -> PublishedBalance | None:
        return self._balances.get(tenant_id)

    def staleness_ms(self, now_ms: int) -> int | None:
        """Since when the view is known to hold every balance the log had; None before the first time."""
        if self.caught_up_at_ms is None:
            return None
        return max(0, now_ms - self.caught_up_at_ms)

    def balance_positions(self) -> dict[int, int]:
        """The next offset of ledger.balances the view will read, per partition."""
        return dict(self._balance_positions)

    def watched_count(self) -> int:
        return sum(len(requests) for requests in self._watched.values())

    # ------------------------------------------------------------------------------------ watching

    def add_listener(self, listener: FoldedListener) -> None:
        self._listeners.append(listener)

    def watch(self, tenant_id: str, request_id: str) -> None:
        """Report `request_id` to the listeners once a balance of the view includes its usage."""
        requests = self._watched.setdefault(tenant_id.encode(), {})
        assert request_id not in requests, f"request {request_id!r} is already watched"
        requests[request_id] = None

    def unwatch(self, tenant_id: str, request_id: str) -> None:
        key = tenant_id.encode()
        requests = self._watched.get(key)
        if requests is None:
            return
        requests.pop(request_id, None)
        if not requests:
            del self._watched[key]

    # ------------------------------------------------------------------------------------ feeding

    def apply_balance_records(self, records: Sequence[LogRecord]) -> None:
        for record in records:
            self._balance_positions[record.partition] = max(
                self._balance_positions.get(record.partition, 0), record.offset + 1
            )
            if record.value is None:  # a tombstone: the tenant is gone
                if record.key is not None:
                    self._balances.pop(record.key.decode(), None)
                continue
            try:
                balance = PublishedBalance.from_record(_balance_decoder.decode(record.value))
            except (msgspec.ValidationError, msgspec.DecodeError) as error:
                logger.warning(
                    "skipping balance %s[%d]@%d: %s", record.topic, record.partition, record.offset, error
                )
                continue
            self._apply_balance(record.partition, balance)
        self._advance_caught_up()

    def apply_event_records(self, records: Sequence[LogRecord]) -> None:
        for record in records:
            requests = self._watched.get(record.key) if record.key is not None else None
            if not requests or record.value is None:
                continue
            try:
                event = decode_event(record.value)
            except InvalidEvent:
                continue  # the processor sends it to the DLQ; it never reaches a balance
            if not isinstance(event, UsageRecorded) or event.tenant_id.encode() != record.key:
                continue  # not usage, or a key the processor refuses (it goes to the DLQ)
            if requests.get(event.event_id, -1) is not None:
                continue  # not watched, or a resend of a usage whose first offset we know
            requests[event.event_id] = record.offset
            balance = self._balances.get(event.tenant_id)
            if balance is not None and balance.applied_offset >= record.offset:
                self._report_folded(record.key, event.event_id, balance)

    def note_end_offsets(self, at_ms: int, balance_ends: dict[int, int], event_ends: dict[int, int]) -> None:
        """The ends of both topics read at `at_ms`: a target to be caught up with, and the lag metrics."""
        self._targets.append((at_ms, dict(balance_ends)))
        while len(self._targets) > CAUGHT_UP_TARGETS_MAX:
            self._targets.popleft()
        self._advance_caught_up()
        unread = sum(max(0, end - self._balance_positions.get(p, 0)) for p, end in balance_ends.items())
        unfolded = sum(
            max(0, end - 1 - self._applied_by_partition.get(p, -1)) for p, end in event_ends.items()
        )
        self.metrics.view_lag_records.labels(topic=self.topics.balances).set(unread)
        self.metrics.view_lag_records.labels(topic=self.topics.events).set(unfolded)
        staleness = self.staleness_ms(at_ms)
        if staleness is not None:
            self.metrics.view_staleness_seconds.set(staleness / 1000)

    # ------------------------------------------------------------------------------------ helpers

    def _apply_balance(self, partition: int, balance: PublishedBalance) -> None:
        current = self._balances.get(balance.tenant_id)
        if current is not None and (current.applied_offset, current.as_of_ms) > (
            balance.applied_offset,
            balance.as_of_ms,
        ):
            return  # a reprocessed older batch (processor recovery): keep the newer balance
        self._balances[balance.tenant_id] = balance
        self._applied_by_partition[partition] = max(
            self._applied_by_partition.get(partition, -1), balance.applied_offset
        )
        key = balance.tenant_id.encode()
        requests = self._watched.get(key)
        if not requests:
            return
        folded = [
            rid for rid, offset in requests.items() if offset is not None and offset <= balance.applied_offset
        ]
        for request_id in folded:
            self._report_folded(key, request_id, balance)

    def _report_folded(self, key: bytes, request_id: str, balance: PublishedBalance) -> None:
        self.unwatch(key.decode(), request_id)
        for listener in self._listeners:
            listener(balance.tenant_id, request_id, balance)

    def _advance_caught_up(self) -> None:
        positions = self._balance_positions
        while self._targets:
            at_ms, ends = self._targets[0]
            if any(positions.get(p, 0) < end for p, end in ends.items()):
                return
            self._targets.popleft()
            self.caught_up_at_ms = at_ms if self.caught_up_at_ms is None else max(self.caught_up_at_ms, at_ms)
            self.ready.set()


class LedgerViewFeed:
    """Runs the two tails and the lag check that keep a `LedgerView` current."""

    def __init__(
        self,
        log: EventLog,
        view: LedgerView,
        settings: AdmissionSettings,
        *,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        assert log.partitions == view.partitions, "the view and the log disagree on the partition count"
        self.log = log
        self.view = view
        self.settings = settings
        self.clock_ms = clock_ms
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Start the tails; the view is ready once it has read the balances present now."""
        assert not self._tasks, "feed already started"
        await self._check_ends()  # the first target: everything on the balances topic now
        self._tasks = [
            asyncio.create_task(self._follow(self.view.topics.events, False, self.view.apply_event_records)),
            asyncio.create_task(
                self._follow(self.view.topics.balances, True, self.view.apply_balance_records)
            ),
            asyncio.create_task(self._check_ends_forever()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT_MS / 1000)
            if pending:
                logger.warning("%d view tasks did not stop within %d ms", len(pending), STOP_TIMEOUT_MS)
        self._tasks = []

    async def wait_ready(self, timeout_ms: int) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.view.ready.wait(), timeout_ms / 1000)
        return self.view.ready.is_set()

    async def _follow(
        self, topic: str, from_beginning: bool, apply: Callable[[Sequence[LogRecord]], None]
    ) -> None:
        batch_max = self.settings.view_batch_records_max
        while True:
            try:
                async for records in self.log.tail(topic, from_beginning=from_beginning, batch_max=batch_max):
                    apply(records)
            except asyncio.CancelledError:
                raise
            except Exception:
                _raise_if_cancelling()  # a log's clean-up may turn our cancellation into another error
                logger.exception("tail of %s failed; restarting in %d ms", topic, TAIL_RESTART_BACKOFF_MS)
            await asyncio.sleep(TAIL_RESTART_BACKOFF_MS / 1000)

    async def _check_ends_forever(self) -> None:
        interval_s = self.settings.view_lag_check_interval_ms / 1000
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._check_ends()
            except asyncio.CancelledError:
                raise
            except Exception:
                _raise_if_cancelling()
                logger.exception("reading the log's end offsets failed; staleness grows until it answers")

    async def _check_ends(self) -> None:
        at_ms = self.clock_ms()
        topics = self.view.topics
        partitions = range(self.view.partitions)
        balance_ends = {p: await self.log.end_offset(topics.balances, p) for p in partitions}
        event_ends = {p: await self.log.end_offset(topics.events, p) for p in partitions}
        self.view.note_end_offsets(at_ms, balance_ends, event_ends)


def _raise_if_cancelling() -> None:
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
