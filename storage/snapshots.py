"""Per-tenant snapshots of the fold, for point-in-time questions (`balance?at=T&as_known_at=K`) without
folding the whole archive.

A snapshot is the tenant's account (`ledger.snapshot.account_to_bytes`) after folding exactly the archived
input events whose knowledge time (`coalesce(known_at_ms, recorded_at_ms)`, the log's append time) is at
or before its `known_through_ms` (K_s). The fold does not care about order, so the ledger as known at any
K >= K_s is the snapshot plus the events known in (K_s, K], folded on top; a snapshot with K_s > K is never
usable for K. Event time plays no part in choosing one: the fold of the events known by K answers every T.

The account state is O(grants), but the usage index beside it (how much usage fell before a time inside
a segment) grows with usage, so a snapshot keeps a sample of it: every `USAGE_STRIDE_TIMES`-th distinct
usage time with the usage before it. The usage between two sampled times (an "edge") is read from the
archive when a query needs it and checked against the sample's difference: a mismatch means the archive
gained an event known by K_s after the snapshot was cut, and the caller falls back to the full fold.

The sample has no models. A tenant with credits scoped to models asks its usage index for usage by model
in a range (`UsageIndex.usage_by_model_between`: at its first scoped grant, once per segment with usage;
when a segment splits or a query falls inside one): where the snapshot has usage in the range, that is
read from the archive (one grouped query) and checked against the sample's total over the range, as an
edge is.

Both kinds of read are kept in one `ArchiveReads` for the answers over one snapshot, which makes each
read where the fold or query needs it: the fold runs in a worker thread and a read waits there for the
archive query, which runs on the event loop (`archive_reads`). A fold that needs hundreds of reads (a
first scoped grant over hundreds of segments with usage) is folded once, not once per read.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
from sqlalchemy import BigInteger, Index, LargeBinary, Text, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from ledger.codec import decode_input_event
from ledger.events import InvalidEvent
from ledger.snapshot import account_from_bytes
from ledger.tenant import TenantLedger
from ledger.usage_index import NO_MODEL, InMemoryUsageIndex, UsageSummary
from storage.base import Base
from storage.projections import LedgerEvent

logger = logging.getLogger(__name__)

INPUT_EVENT_TYPES = ("credit_granted", "grant_voided", "usage_recorded")
USAGE_STRIDE_TIMES = 512  # distinct usage times between two sampled ones: an edge read's size
EDGE_READS_MAX = 64  # archive reads (edges, usage by model) an answer makes before giving up on the snapshot


class AuditSnapshot(Base):
    """A tenant's fold of every input event known at or before `known_through_ms` (module docstring)."""

    __tablename__ = "audit_snapshots"

    tenant_id: Mapped[str] = mapped_column(Text, primary_key=True)
    known_through_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    events: Mapped[int] = mapped_column(BigInteger)  # input events folded into it
    account: Mapped[bytes] = mapped_column(LargeBinary)  # ledger.snapshot.account_to_bytes
    usage: Mapped[bytes] = mapped_column(LargeBinary)  # UsageSample, msgpack
    created_at_ms: Mapped[int] = mapped_column(BigInteger)


def usage_amount() -> object:
    """An archived usage event's amount, as a bigint (amounts go up to ledger.events.AMOUNT_MAX, 2**62:
    `as_integer()` would cast to a 32-bit integer)."""
    return LedgerEvent.payload["amount"].astext.cast(BigInteger)


def knowledge_time() -> object:
    """An archived event's knowledge time (the log's append time; the projector's clock for old rows)."""
    return func.coalesce(LedgerEvent.known_at_ms, LedgerEvent.recorded_at_ms)


# The snapshots' reads: a tenant's events in knowledge order, from a knowledge time on.
Index("ix_ledger_events_tenant_id_known", LedgerEvent.tenant_id, knowledge_time(), LedgerEvent.event_id)


class UsageSample(msgspec.Struct, array_like=True, frozen=True):
    """Sampled usage times `times` (ascending, each a time some usage happened), `before[j]` = usage
    strictly before `times[j]`, `total` = all usage, `last_at` = the latest usage time (-1: none)."""

    times: list[int]
    before: list[int]
    total: int
    last_at: int


EMPTY_SAMPLE = UsageSample([], [], 0, -1)
_encode = msgspec.msgpack.Encoder().encode
_decode_sample = msgspec.msgpack.Decoder(UsageSample).decode


def sample_to_bytes(sample: UsageSample) -> bytes:
    return _encode(sample)


def sample_from_bytes(data: bytes) -> UsageSample:
    return _decode_sample(data)


class EdgeNeeded(NamedTuple):
    """A read an answer needs: the snapshot's usage by millisecond inside sampled interval `interval`."""

    interval: int


class ModelUsageNeeded(NamedTuple):
    """A read an answer needs: the snapshot's usage by model in [start, end), where the snapshot has usage
    `total` (what the read must sum to)."""

    start: int
    end: int
    total: int


class SnapshotStale(Exception):
    """The archive no longer matches the snapshot (an event known by K_s arrived after it was cut), or an
    answer needs more archive reads than it may make."""


@dataclass
class ArchiveReads:
    """The archive reads of the answers over one snapshot: `fetch(need)` makes one (blocking the calling
    thread until the archive answers) and returns what it read, checked (`check_edge`, `check_model_usage`);
    at most `reads_max` of them (None: no limit), then SnapshotStale. What was read is kept: edges (usage by
    millisecond inside sampled interval i, sorted) and usage by model in [start, end) (positive, no
    `NO_MODEL`). Not thread-safe: one fold or query at a time."""

    fetch: Callable[[EdgeNeeded | ModelUsageNeeded], Any]
    reads_max: int | None = EDGE_READS_MAX
    edges: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    model_usage: dict[tuple[int, int], dict[str, int]] = field(default_factory=dict)
    done: int = 0

    def edge(self, interval: int) -> list[tuple[int, int]]:
        edge = self.edges.get(interval)
        if edge is None:
            edge = self.edges[interval] = self._read(EdgeNeeded(interval))
        return edge

    def usage_by_model(self, need: ModelUsageNeeded) -> dict[str, int]:
        usage = self.model_usage.get((need.start, need.end))
        if usage is None:
            usage = self.model_usage[need.start, need.end] = self._read(need)
        return usage

    def _read(self, need: EdgeNeeded | ModelUsageNeeded) -> Any:
        if self.reads_max is not None and self.done >= self.reads_max:
            raise SnapshotStale(f"more than {self.reads_max} archive reads needed")
        self.done += 1
        return self.fetch(need)


def interval_bounds(sample: UsageSample, interval: int) -> tuple[int, int]:
    """[start, end) of sampled interval `interval` in event time."""
    end = sample.times[interval + 1] if interval + 1 < len(sample.times) else sample.last_at + 1
    return sample.times[interval], end


def interval_total(sample: UsageSample, interval: int) -> int:
    after = sample.before[interval + 1] if interval + 1 < len(sample.times) else sample.total
    return after - sample.before[interval]


def check_edge(sample: UsageSample, interval: int, amount_by_time: dict[int, int]) -> list[tuple[int, int]]:
    """The edge read from the archive, sorted, if it sums to what the sample says; else SnapshotStale."""
    if sum(amount_by_time.values()) != interval_total(sample, interval):
        raise SnapshotStale(f"usage in sampled interval {interval} differs from the snapshot")
    return sorted(amount_by_time.items())


def check_model_usage(need: ModelUsageNeeded, amount_by_model: dict[str, int]) -> dict[str, int]:
    """The usage by model read from the archive (every model, `NO_MODEL` included), as the index answers
    it (positive, no `NO_MODEL`), if it sums to what the snapshot says; else SnapshotStale."""
    if sum(amount_by_model.values()) != need.total:
        raise SnapshotStale(f"usage by model in [{need.start}, {need.end}) differs from the snapshot")
    return {model: amount for model, amount in amount_by_model.items() if amount > 0 and model != NO_MODEL}


class SnapshotUsageIndex:
    """A `UsageIndex` over the snapshot's usage (the sample, and what `reads` reads from the archive where
    the sample cannot answer) and the usage folded on top of it (`delta`). The archive holds each event id
    once, so `seen` asks the delta only."""

    def __init__(self, sample: UsageSample, reads: ArchiveReads) -> None:
        self.sample = sample
        self.reads = reads
        self.delta = InMemoryUsageIndex()

    def seen(self, event_id: str) -> bool:
        return self.delta.seen(event_id)

    def record(self, event_id: str, occurred_at: int, amount: int, model: str) -> None:
        self.delta.record(event_id, occurred_at, amount, model)

    def usage_by_model_between(self, start: int, end: int) -> dict[str, int]:
        usage = self.delta.usage_by_model_between(start, end)
        total = self._base_between(start, end).total
        if not total:
            return usage
        for model, amount in self.reads.usage_by_model(ModelUsageNeeded(start, end, total)).items():
            usage[model] = usage.get(model, 0) + amount
        return usage

    def usage_between(self, start: int, end: int) -> UsageSummary:
        mine = self._base_between(start, end)
        delta = self.delta.usage_between(start, end)
        firsts = [t for t in (mine.first_at, delta.first_at) if t is not None]
        lasts = [t for t in (mine.last_at, delta.last_at) if t is not None]
        return UsageSummary(
            mine.total + delta.total, min(firsts) if firsts else None, max(lasts) if lasts else None
        )

    def _before(self, t: int) -> int:
        """The snapshot's usage strictly before t."""
        sample = self.sample
        if not sample.times or t <= sample.times[0]:
            return 0
        if t > sample.last_at:
            return sample.total
        interval = bisect_right(sample.times, t) - 1
        if sample.times[interval] == t:
            return sample.before[interval]
        return sample.before[interval] + sum(a for at, a in self.reads.edge(interval) if at < t)

    def _base_between(self, start: int, end: int) -> UsageSummary:
        sample = self.sample
        low, high = max(start, sample.times[0] if sample.times else 0), min(end, sample.last_at + 1)
        if low >= high:
            return UsageSummary(0, None, None)
        total = self._before(high) - self._before(low)
        if total == 0:
            return UsageSummary(0, None, None)
        return UsageSummary(total, self._first_from(low, high), self._last_before(low, high))

    def _first_from(self, low: int, high: int) -> int | None:
        sample = self.sample
        interval = bisect_right(sample.times, low) - 1
        later = [at for at, _ in self.reads.edge(interval) if at >= low]
        if later:
            return later[0] if later[0] < high else None
        following = interval + 1
        if following < len(sample.times) and sample.times[following] < high:
            return sample.times[following]
        return None

    def _last_before(self, low: int, high: int) -> int | None:
        sample = self.sample
        interval = bisect_right(sample.times, high - 1) - 1
        earlier = [at for at, _ in self.reads.edge(interval) if at < high]
        return earlier[-1] if earlier and earlier[-1] >= low else None


def merged_sample(base: UsageSample, delta: InMemoryUsageIndex) -> UsageSample:
    """The sample of base + delta: base's sampled times (their usage-before grown by the delta's) plus
    every `USAGE_STRIDE_TIMES`-th delta time outside base's range (inside it, no usage-before is known
    without reading an edge; late usage there only makes that interval denser)."""
    amounts = delta.usage_by_time()
    if not amounts:
        return base
    delta_times = sorted(amounts)
    cumulative = [0]
    for at in delta_times:
        cumulative.append(cumulative[-1] + amounts[at])

    def delta_before(t: int) -> int:
        return cumulative[bisect_left(delta_times, t)]

    first, last = (base.times[0], base.last_at) if base.times else (None, -1)
    outside = [t for t in delta_times if first is None or t < first or t > last]
    chosen = set(outside[::USAGE_STRIDE_TIMES])
    times = sorted(set(base.times) | chosen)
    base_by_time = dict(zip(base.times, base.before, strict=True))
    before = []
    for t in times:
        base_before = base_by_time.get(t, 0 if first is None or t < first else base.total)
        before.append(base_before + delta_before(t))
    return UsageSample(times, before, base.total + cumulative[-1], max(last, delta_times[-1]))


def folded_on(snapshot: AuditSnapshot, reads: ArchiveReads, events: Sequence) -> TenantLedger:
    """A fresh ledger from the snapshot with `events` (decoded input events known after it) folded on top,
    its index reading through `reads` what the snapshot's sample cannot answer."""
    ledger = TenantLedger(snapshot.tenant_id)
    ledger.account = account_from_bytes(snapshot.account)
    ledger.index = SnapshotUsageIndex(sample_from_bytes(snapshot.usage), reads)
    for event in events:
        ledger.apply(event)
    return ledger


def decoded_events(tenant_id: str, payloads: Sequence[dict]) -> list:
    """The archived input events as the fold takes them; one the fold cannot take is skipped (logged)."""
    events = []
    for payload in payloads:
        try:
            events.append(decode_input_event(msgspec.json.encode(payload)))
        except InvalidEvent as error:
            logger.warning("snapshot of %s: skipping archived event: %s", tenant_id, error.reason)
    return events


def archive_reads(
    session: AsyncSession, snapshot: AuditSnapshot, reads_max: int | None = EDGE_READS_MAX
) -> ArchiveReads:
    """Reads of the snapshot's usage from the archive through `session`, for a fold or query over the
    snapshot that runs in a worker thread (`asyncio.to_thread`) while this event loop runs the queries:
    call it on the loop, use it off the loop. A read that does not match the snapshot raises SnapshotStale
    in the worker, as does one more than `reads_max`."""
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    sample = sample_from_bytes(snapshot.usage)

    async def read(need: EdgeNeeded | ModelUsageNeeded) -> Any:
        if type(need) is EdgeNeeded:
            return await read_edge(session, snapshot, sample, need.interval)
        return await read_model_usage(session, snapshot, need)

    def fetch(need: EdgeNeeded | ModelUsageNeeded) -> Any:
        assert threading.get_ident() != loop_thread, "an archive read on the event loop would block it"
        return asyncio.run_coroutine_threadsafe(read(need), loop).result()

    return ArchiveReads(fetch, reads_max)


async def read_edge(
    session: AsyncSession, snapshot: AuditSnapshot, sample: UsageSample, interval: int
) -> list[tuple[int, int]]:
    start, end = interval_bounds(sample, interval)
    rows = await session.execute(
        select(LedgerEvent.occurred_at_ms, func.sum(usage_amount()))
        .where(
            LedgerEvent.tenant_id == snapshot.tenant_id,
            LedgerEvent.event_type == "usage_recorded",
            LedgerEvent.occurred_at_ms >= start,
            LedgerEvent.occurred_at_ms < end,
            knowledge_time() <= snapshot.known_through_ms,
        )
        .group_by(LedgerEvent.occurred_at_ms)
    )
    return check_edge(sample, interval, {at: int(amount) for at, amount in rows.all()})


async def read_model_usage(
    session: AsyncSession, snapshot: AuditSnapshot, need: ModelUsageNeeded
) -> dict[str, int]:
    """The snapshot's usage by model in [need.start, need.end): one grouped query over the archive (grouped
    in an outer query by the inner one's column: an expression with bound parameters in both the select
    list and GROUP BY is two different expressions to Postgres)."""
    usage = (
        select(
            func.coalesce(LedgerEvent.payload["model"].as_string(), NO_MODEL).label("model"),
            usage_amount().label("amount"),
        )
        .where(
            LedgerEvent.tenant_id == snapshot.tenant_id,
            LedgerEvent.event_type == "usage_recorded",
            LedgerEvent.occurred_at_ms >= need.start,
            LedgerEvent.occurred_at_ms < need.end,
            knowledge_time() <= snapshot.known_through_ms,
        )
        .subquery()
    )
    rows = await session.execute(select(usage.c.model, func.sum(usage.c.amount)).group_by(usage.c.model))
    return check_model_usage(need, {name: int(amount) for name, amount in rows.all()})


async def latest_snapshot(
    session: AsyncSession, tenant_id: str, as_known_at_ms: int | None
) -> AuditSnapshot | None:
    """The tenant's latest snapshot usable as known at K: K_s <= K (any, when K is None)."""
    query = select(AuditSnapshot).where(AuditSnapshot.tenant_id == tenant_id)
    if as_known_at_ms is not None:
        query = query.where(AuditSnapshot.known_through_ms <= as_known_at_ms)
    return (
        await session.scalars(query.order_by(AuditSnapshot.known_through_ms.desc()).limit(1))
    ).one_or_none()


async def events_known_after(
    session: AsyncSession, tenant_id: str, after_ms: int | None, through_ms: int | None, limit: int
) -> list[tuple[int, str, dict]]:
    """The tenant's archived input events known in (after_ms, through_ms], in knowledge order (time, id),
    at most `limit` (None bounds: open)."""
    known = knowledge_time()
    query = select(known, LedgerEvent.event_id, LedgerEvent.payload).where(
        LedgerEvent.tenant_id == tenant_id, LedgerEvent.event_type.in_(INPUT_EVENT_TYPES)
    )
    if after_ms is not None:
        query = query.where(known > after_ms)
    if through_ms is not None:
        query = query.where(known <= through_ms)
    rows = await session.execute(query.order_by(known, LedgerEvent.event_id).limit(limit))
    return [tuple(row) for row in rows.all()]
