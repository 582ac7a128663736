"""The one Kafka producer every writer uses, with a durable spool for when the broker is away.

`EventProducer.publish(event)` sends a ledger event to `ledger.events` (key = tenant id, value =
`ledger.codec.encode_event(event)`) with acks=all and idempotence, and returns once the broker has
acknowledged it, or, when the broker does not answer within `publish_ack_timeout_ms`, once the event
is fsync'd in the local spool (`streams.spool`). Either way the event is never lost: a background task
resends the spool, oldest first, in bounded batches with exponential backoff, and deletes each record
only after the broker acknowledged it. While anything is spooled, new records go to the spool too, so
they stay behind the older ones.

Duplicates. Within one process no record is sent twice: a record that timed out while the Kafka
client still holds it is not handed to the client again; the client's own idempotent retries (same
producer id and sequence number, deduplicated by the broker) deliver it once, and the spool row is
deleted when that delivery is acknowledged. A duplicate record can appear on the topic only when an
acknowledgement is lost for good: the process dies (or the client is replaced after a fatal error)
after the broker wrote a record but before its spool row was deleted; the record is then resent on the
next start. That is harmless: every ledger event carries an `event_id`, and consumers (the fold, the
projections) apply an event id at most once ("a duplicate changes nothing", DESIGN.md). Records on the
derived topics sent with `send()` need the same property from their consumers: carry an id and
deduplicate, or be idempotent by key (the compacted `ledger.balances`).

`send_partitioned(records)` is the stream processor's bulk path: records go straight into the client's
record batches on the partitions they name, and it raises instead of spooling (the processor retries
its whole batch from its committed offsets).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError

from ledger.codec import encode_event
from ledger.events import Event
from streams.settings import StreamSettings
from streams.spool import OutgoingRecord, Spool, SpooledRecord, open_process_spool
from streams.topics import LedgerTopics

log = logging.getLogger(__name__)


class PublishRejected(RuntimeError):
    """The broker refused records for a reason a retry cannot fix (e.g. too large); they were not sent."""


class BrokerUnavailable(RuntimeError):
    """`send_partitioned` could not get the broker's acknowledgement; the caller retries the whole batch."""


class PartitionedRecord(NamedTuple):
    """A record whose partition the sender chose (a processor's outputs stay on its tenant's partition). A
    tuple: a processor builds one per output record (a frozen dataclass cost several times more)."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes

    @property
    def size_bytes(self) -> int:
        return len(self.key or b"") + len(self.value)


@dataclass(frozen=True)
class PublishReceipt:
    """Where a record went: acknowledged at (partition, offset), or durably spooled as spool_seq."""

    topic: str
    partition: int | None = None
    offset: int | None = None
    spool_seq: int | None = None

    @property
    def spooled(self) -> bool:
        return self.spool_seq is not None


def open_spool(settings: StreamSettings) -> Spool:
    """The file spool_path names when set; otherwise this process's own spool in spool_dir."""
    if settings.spool_path is not None:
        return Spool(settings.spool_path, settings.spool_size_max_bytes)
    return open_process_spool(settings.spool_dir, settings.spool_size_max_bytes)


def _is_retriable(error: BaseException) -> bool:
    """Broker away, leader moving, timeouts: worth spooling. Anything else is the record's own fault."""
    return isinstance(error, KafkaTimeoutError) or (isinstance(error, KafkaError) and error.retriable)


@dataclass
class DirectOutcome:
    """What became of records sent straight to the broker: a receipt for each acknowledged one (None for
    the others), those to spool (index, record, the client's future if it may still deliver it) and the
    broker's refusals."""

    receipts: list[PublishReceipt | None]
    to_spool: list[tuple[int, OutgoingRecord, asyncio.Future | None]]
    rejected: list[str]


def sort_direct_outcomes(
    records: Sequence[OutgoingRecord], futures: Sequence[asyncio.Future | None]
) -> DirectOutcome:
    """Sort each record by its send future: acknowledged, refused for good, or to spool (not handed over,
    not acknowledged in time, or failed retriably: the client gave up on it, the spool resends it)."""
    outcome = DirectOutcome(receipts=[], to_spool=[], rejected=[])
    for index, (record, future) in enumerate(zip(records, futures, strict=True)):
        if future is not None and future.done() and future.exception() is None:
            metadata = future.result()
            outcome.receipts.append(PublishReceipt(record.topic, metadata.partition, metadata.offset))
            continue
        outcome.receipts.append(None)
        if future is not None and future.done():
            error = future.exception()
            if not _is_retriable(error):
                outcome.rejected.append(f"{record.topic}: {error!r}")
                continue
            future = None  # the client gave up on it: the spool resends it
        outcome.to_spool.append((index, record, future))
    return outcome


class EventProducer:
    def __init__(self, settings: StreamSettings, *, spool: Spool | None = None) -> None:
        assert settings.resend_backoff_initial_ms <= settings.resend_backoff_max_ms, "backoff initial > max"
        self.settings = settings
        self.topics = LedgerTopics.from_settings(settings)
        self._spool = spool
        self._kafka: AIOKafkaProducer | None = None
        self._spooling = False
        # spool seq -> the Kafka client's delivery future for a record that timed out while the client
        # still holds it: the client delivers it (idempotently), so it is never handed over again.
        self._in_flight: dict[int, asyncio.Future] = {}
        self._mode_lock: asyncio.Lock | None = None
        self._wakeup: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        self._drainer: asyncio.Task | None = None
        self._started = False

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the spool and connect. An unreachable broker is not an error: publishing spools."""
        assert not self._started, "EventProducer.start() called twice"
        if self._spool is None:
            self._spool = await asyncio.to_thread(open_spool, self.settings)
        self._mode_lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._kafka = await self._connect()
        self._spooling = self._kafka is None or self._spool.count() > 0
        if not self._spooling:
            self._drained.set()
        self._drainer = asyncio.create_task(self._drain_forever(), name="event-producer-spool-drainer")
        self._wakeup.set()
        self._started = True

    async def stop(self) -> None:
        """Stop resending, let the Kafka client flush (bounded), close. Spooled records stay on disk."""
        if not self._started:
            return
        self._started = False
        assert self._drainer is not None
        self._drainer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drainer
        if self._kafka is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kafka.flush(), self.settings.producer_close_timeout_ms / 1000)
            await self._settle_in_flight()
            await self._close_client(self._kafka)
            self._kafka = None
        self._in_flight.clear()
        assert self._spool is not None
        await asyncio.to_thread(self._spool.close)

    async def __aenter__(self) -> EventProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    # ------------------------------------------------------------------------------------ publishing

    async def publish(self, event: Event) -> PublishReceipt:
        """Send one ledger event to ledger.events (key = tenant id); acknowledged or durably spooled."""
        (receipt,) = await self.publish_many([event])
        return receipt

    async def publish_many(self, events: Sequence[Event]) -> list[PublishReceipt]:
        records = [
            OutgoingRecord(self.topics.events, event.tenant_id.encode(), encode_event(event))
            for event in events
        ]
        return await self.send_many(records)

    async def send(self, topic: str, key: bytes | None, value: bytes) -> PublishReceipt:
        """Send raw bytes to any topic (derived topics: entries, balances, dlq); same guarantees."""
        (receipt,) = await self.send_many([OutgoingRecord(topic, key, value)])
        return receipt

    async def send_many(self, records: Sequence[OutgoingRecord]) -> list[PublishReceipt]:
        assert self._started, "EventProducer is not started"
        if not records:
            return []
        if self._spooling:
            receipts = await self._spool_if_still_spooling(records)
            if receipts is not None:
                return receipts
        return await self._send_direct(records)

    async def send_partitioned(self, records: Sequence[PartitionedRecord]) -> None:
        """Send records to the partitions they name, in order per partition, and wait for every ack.

        The bulk path of a stream processor's outputs: records go into the client's record batches
        directly (no per-record send call), so thousands cost little more than one. Nothing is spooled
        here: a processor that cannot publish retries its whole batch from its committed offsets
        (`streams.batch_processor`), so this raises `BrokerUnavailable` when the broker is away or does
        not acknowledge within `publish_ack_timeout_ms`, and `PublishRejected` for a record the broker
        refuses for good.
        """
        assert self._started, "EventProducer is not started"
        kafka = self._kafka
        if kafka is None or self._spooling:
            raise BrokerUnavailable("the broker is away (this producer is spooling)")
        open_batches: dict[tuple[str, int], object] = {}
        ready: list[tuple[str, int, object]] = []
        for record in records:
            destination = (record.topic, record.partition)
            batch = open_batches.get(destination)
            if batch is None or batch.append(key=record.key, value=record.value, timestamp=None) is None:
                if batch is not None:
                    ready.append((*destination, batch))
                batch = open_batches[destination] = kafka.create_batch()
                # an empty batch takes any record
                batch.append(key=record.key, value=record.value, timestamp=None)
        ready.extend((*destination, batch) for destination, batch in open_batches.items())
        for _topic, _partition, batch in ready:
            # Closed: the client sends it at once. An open batch lingers `producer_linger_ms` in the client,
            # and the next batch of its partition waits for it: idle time in every awaited publish.
            batch.close()
        try:
            futures = [
                await kafka.send_batch(batch, topic, partition=partition) for topic, partition, batch in ready
            ]
            await asyncio.wait_for(asyncio.gather(*futures), self.settings.publish_ack_timeout_ms / 1000)
        except (KafkaError, TimeoutError) as error:
            if isinstance(error, KafkaError) and not _is_retriable(error):
                raise PublishRejected(f"the broker refused a batch: {error!r}") from error
            raise BrokerUnavailable(f"the broker did not acknowledge a batch: {error!r}") from error

    def spooled_count(self) -> int:
        """Records waiting in the spool (including those the Kafka client is still delivering)."""
        assert self._spool is not None, "EventProducer is not started"
        return self._spool.count()

    async def wait_until_drained(self, timeout_ms: int) -> bool:
        """Wait until the spool is empty and publishing goes straight to the broker; False on timeout."""
        assert self._drained is not None, "EventProducer is not started"
        try:
            await asyncio.wait_for(self._drained.wait(), timeout_ms / 1000)
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------------------------------ direct path

    async def _send_direct(self, records: Sequence[OutgoingRecord]) -> list[PublishReceipt]:
        futures = await self._hand_over(records)
        waiting = [future for future in futures if future is not None]
        if waiting:
            await asyncio.wait(waiting, timeout=self.settings.publish_ack_timeout_ms / 1000)
        outcome = sort_direct_outcomes(records, futures)
        receipts = outcome.receipts
        if outcome.to_spool:
            sequence_numbers = await self._spool_records(outcome.to_spool)
            for (index, record, _), seq in zip(outcome.to_spool, sequence_numbers, strict=True):
                receipts[index] = PublishReceipt(record.topic, spool_seq=seq)
        if outcome.rejected:
            raise PublishRejected("the broker refused: " + "; ".join(outcome.rejected))
        assert all(receipt is not None for receipt in receipts), "a record has neither an ack nor a spool row"
        return receipts

    async def _hand_over(self, records: Sequence[OutgoingRecord]) -> list[asyncio.Future | None]:
        """Each record's send future from the Kafka client, in order; None for those it did not take (no
        client, or it refused one retriably: that one and the rest go to the spool, behind it)."""
        kafka = self._kafka
        if kafka is None:
            return [None] * len(records)
        futures: list[asyncio.Future | None] = []
        for record in records:
            try:
                futures.append(await kafka.send(record.topic, record.value, key=record.key))
            except KafkaError as error:
                if not _is_retriable(error):
                    raise PublishRejected(f"{record.topic}: {error!r}") from error
                log.warning("Kafka client did not take a record (%r); spooling", error)
                break
        return futures + [None] * (len(records) - len(futures))

    async def _spool_records(
        self, entries: list[tuple[int, OutgoingRecord, asyncio.Future | None]]
    ) -> list[int]:
        """Spool records the broker did not acknowledge in time; switch to spooling mode."""
        assert self._mode_lock is not None, "the producer is started"
        assert self._spool is not None, "the producer has its spool"
        async with self._mode_lock:
            sequence_numbers = await asyncio.to_thread(
                self._spool.append, [record for _, record, _ in entries]
            )
            for (_, _, future), seq in zip(entries, sequence_numbers, strict=True):
                if future is not None:
                    self._in_flight[seq] = future
            if not self._spooling:
                log.warning(
                    "broker did not acknowledge %d records in time: spooling to %s",
                    len(entries),
                    self._spool.path,
                )
            self._enter_spooling()
        return sequence_numbers

    async def _spool_if_still_spooling(
        self, records: Sequence[OutgoingRecord]
    ) -> list[PublishReceipt] | None:
        assert self._mode_lock is not None, "the producer is started"
        assert self._spool is not None, "the producer has its spool"
        async with self._mode_lock:
            if not self._spooling:
                return None
            sequence_numbers = await asyncio.to_thread(self._spool.append, list(records))
            self._wakeup.set()
        return [
            PublishReceipt(record.topic, spool_seq=seq)
            for record, seq in zip(records, sequence_numbers, strict=True)
        ]

    def _enter_spooling(self) -> None:
        self._spooling = True
        self._drained.clear()
        self._wakeup.set()

    # ------------------------------------------------------------------------------------ resending

    async def _drain_forever(self) -> None:
        backoff_ms = self.settings.resend_backoff_initial_ms
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._spool.count() > 0:
                try:
                    progressed = await self._resend_oldest()
                except Exception:  # the drainer must outlive any one failure; the records stay spooled
                    log.exception("resending from the spool failed; retrying after backoff")
                    progressed = False
                if progressed:
                    backoff_ms = self.settings.resend_backoff_initial_ms
                    continue
                await asyncio.sleep(backoff_ms / 1000)
                backoff_ms = min(backoff_ms * 2, self.settings.resend_backoff_max_ms)
            async with self._mode_lock:
                if self._spool.count() == 0 and self._spooling:
                    self._spooling = False
                    self._in_flight.clear()
                    self._drained.set()
                    log.info("spool drained: publishing straight to the broker again")

    async def _resend_oldest(self) -> bool:
        """Resend one bounded batch, oldest first; True if the broker acknowledged any of it."""
        kafka = await self._ensure_client()
        if kafka is None:
            return False
        batch, in_flight = await self._oldest_batch()
        futures, handover_fatal = await self._hand_over_spooled(kafka, batch, in_flight)
        self._in_flight.update(futures)
        if futures:
            await asyncio.wait(futures.values(), timeout=self.settings.publish_ack_timeout_ms / 1000)
        acknowledged, ack_fatal = self._settle_batch(futures)
        if acknowledged:
            await asyncio.to_thread(self._spool.remove, acknowledged)
        fatal = ack_fatal if ack_fatal is not None else handover_fatal
        if fatal is not None:
            log.error(
                "Kafka client failed for good (%r): replacing it; its unacknowledged records are resent",
                fatal,
            )
            await self._replace_client()
        return bool(acknowledged)

    async def _ensure_client(self) -> AIOKafkaProducer | None:
        """The Kafka client, connected now if there is none; None while the broker is unreachable."""
        if self._kafka is None:
            self._kafka = await self._connect()
        return self._kafka

    async def _oldest_batch(self) -> tuple[list[SpooledRecord], dict[int, asyncio.Future]]:
        """The oldest spooled records (at most resend_batch_max) and the futures of those the client still
        holds."""
        async with self._mode_lock:  # rows and their in-flight futures are registered together
            batch = await asyncio.to_thread(self._spool.oldest, self.settings.resend_batch_max)
            in_flight = {
                record.seq: self._in_flight[record.seq] for record in batch if record.seq in self._in_flight
            }
        return batch, in_flight

    @staticmethod
    async def _hand_over_spooled(
        kafka: AIOKafkaProducer, batch: list[SpooledRecord], in_flight: dict[int, asyncio.Future]
    ) -> tuple[dict[int, asyncio.Future], BaseException | None]:
        """Each record's future by spool seq, in order (the client's own where it still holds the record),
        up to the first the client does not take; and that refusal when it is for good."""
        futures: dict[int, asyncio.Future] = {}
        for record in batch:
            if record.seq in in_flight:
                futures[record.seq] = in_flight[record.seq]
                continue
            try:
                futures[record.seq] = await kafka.send(record.topic, record.value, key=record.key)
            except KafkaError as error:
                # keep the order: nothing after a record that could not be handed over
                return futures, None if _is_retriable(error) else error
        return futures, None

    def _settle_batch(self, futures: dict[int, asyncio.Future]) -> tuple[list[int], BaseException | None]:
        """The acknowledged seqs of a resent batch, and the last failure for good; the finished futures
        leave the in-flight map (one the client still holds waits for the next round, never handed over
        again)."""
        acknowledged = []
        fatal: BaseException | None = None
        for seq, future in futures.items():
            if not future.done():
                continue
            del self._in_flight[seq]
            error = future.exception()
            if error is None:
                acknowledged.append(seq)
            elif not _is_retriable(error):
                fatal = error
        return acknowledged, fatal

    async def _settle_in_flight(self) -> None:
        acknowledged = [
            seq
            for seq, future in self._in_flight.items()
            if future.done() and not future.cancelled() and future.exception() is None
        ]
        if acknowledged:
            await asyncio.to_thread(self._spool.remove, acknowledged)

    # ------------------------------------------------------------------------------------ the client

    def _new_client(self) -> AIOKafkaProducer:
        settings = self.settings
        return AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            client_id="tollgate-event-producer",
            acks="all",
            enable_idempotence=True,
            linger_ms=settings.producer_linger_ms,
            max_batch_size=settings.producer_batch_size_bytes,
            request_timeout_ms=settings.producer_request_timeout_ms,
            retry_backoff_ms=settings.producer_retry_backoff_ms,
            metadata_max_age_ms=settings.producer_metadata_max_age_ms,
            connections_max_idle_ms=settings.producer_connections_max_idle_ms,
            compression_type=None,
        )

    async def _connect(self) -> AIOKafkaProducer | None:
        client = self._new_client()
        try:
            await client.start()
        except KafkaError as error:
            log.warning(
                "Kafka at %s unreachable (%r): publishing spools",
                self.settings.kafka_bootstrap_servers,
                error,
            )
            await self._close_client(client)
            return None
        return client

    async def _replace_client(self) -> None:
        old, self._kafka = self._kafka, None
        self._in_flight.clear()  # futures of the old client: their records are resent from the spool
        if old is not None:
            await self._close_client(old)

    async def _close_client(self, client: AIOKafkaProducer) -> None:
        """Close the client; if it cannot flush in time (broker away), abandon its pending batches.

        Abandoning is safe: every record it still held is in the spool and is resent from there.
        """
        closing = asyncio.ensure_future(client.stop())
        done, _ = await asyncio.wait({closing}, timeout=self.settings.producer_close_timeout_ms / 1000)
        if not done:
            # aiokafka 0.14: stop() waits for the flush or the sender
            sender = getattr(client, "_sender", None)
            if sender is not None:
                await sender.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(closing, self.settings.producer_close_timeout_ms / 1000)
        if closing.done() and not closing.cancelled() and closing.exception() is not None:
            log.warning("closing the Kafka client failed: %r", closing.exception())
