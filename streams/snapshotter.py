"""Writes a tenant's fold snapshots (storage.snapshots): one every `audit_snapshot_every_events` archived
input events, in knowledge order, each built on the previous one.

A snapshot is cut only between two knowledge times (every event known at its K_s is in it) and never at
the tenant's latest knowledge time (an event of that millisecond may still be on its way to the
archive). When the previous snapshot no longer matches the archive (`SnapshotStale`), the tenant's
snapshots are rebuilt from its first event. Folding a batch over the previous snapshot reads from the
archive what the snapshot's usage sample cannot answer (storage.snapshots.archive_reads) with no limit on
the number of reads: a tenant's first grant scoped to models reads usage by model once per segment with
usage, and a limit would make a snapshot that needs more give up, be rebuilt, and give up again.

Run by the projector after each batch it commits (`Snapshotter`, for the tenants whose events the batch
archived), at most `SNAPSHOTS_PER_BATCH_MAX` snapshots a batch, so one batch's extra work stays bounded (a
tenant that is further behind catches up over the following batches).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from ledger.account import Account
from ledger.snapshot import account_to_bytes
from storage.snapshots import (
    EMPTY_SAMPLE,
    INPUT_EVENT_TYPES,
    AuditSnapshot,
    SnapshotStale,
    archive_reads,
    decoded_events,
    events_known_after,
    folded_on,
    latest_snapshot,
    merged_sample,
    sample_from_bytes,
    sample_to_bytes,
)
from streams.audit_checkpoints import AuditSettings

logger = logging.getLogger(__name__)

SNAPSHOTS_PER_BATCH_MAX = 4  # snapshots the projector writes after one batch, over all its tenants


def first_snapshot(tenant_id: str) -> AuditSnapshot:
    """The fold of nothing: where a tenant's snapshots start (never stored)."""
    return AuditSnapshot(
        tenant_id=tenant_id,
        known_through_ms=-1,
        events=0,
        account=account_to_bytes(Account(tenant_id)),
        usage=sample_to_bytes(EMPTY_SAMPLE),
        created_at_ms=0,
    )


def cut(rows: list[tuple[int, str, dict]], every_events: int) -> int:
    """How many of `rows` (in knowledge order) the next snapshot takes: at least `every_events`, up to a
    change of knowledge time that is not the last one present; 0 when there is none yet."""
    index = every_events
    while index < len(rows) and rows[index][0] == rows[index - 1][0]:
        index += 1
    return index if index < len(rows) else 0


async def snapshot_tenant(
    session_factory: Callable[[], AsyncSession],
    tenant_id: str,
    every_events: int,
    now_ms: int,
    snapshots_max: int | None = None,
) -> int:
    """Writes the tenant's due snapshots (at most `snapshots_max`); returns how many."""
    written = 0
    async with session_factory() as session:
        base = await latest_snapshot(session, tenant_id, None) or first_snapshot(tenant_id)
        while snapshots_max is None or written < snapshots_max:
            after = None if base.known_through_ms < 0 else base.known_through_ms
            rows = await events_known_after(session, tenant_id, after, None, 2 * every_events)
            taken = cut(rows, every_events)
            if not taken:
                return written
            events = decoded_events(tenant_id, [payload for _, _, payload in rows[:taken]])
            try:
                # No limit on the archive reads: the balance query gives up after EDGE_READS_MAX and
                # folds the archive, but a snapshot that gave up here would be rebuilt, and give up again.
                # In a worker thread: its reads wait there for this loop to run them.
                reads = archive_reads(session, base, reads_max=None)
                ledger = await asyncio.to_thread(folded_on, base, reads, events)
            except SnapshotStale as stale:
                logger.warning("snapshots of %s are stale (%s): rebuilding them", tenant_id, stale)
                await session.execute(delete(AuditSnapshot).where(AuditSnapshot.tenant_id == tenant_id))
                await session.commit()
                base = first_snapshot(tenant_id)
                continue
            fields = {
                "tenant_id": tenant_id,
                "known_through_ms": rows[taken - 1][0],
                "events": base.events + taken,
                "account": account_to_bytes(ledger.account),
                "usage": sample_to_bytes(merged_sample(sample_from_bytes(base.usage), ledger.index.delta)),
                "created_at_ms": now_ms,
            }
            session.add(AuditSnapshot(**fields))
            await session.commit()
            base = AuditSnapshot(**fields)  # not the session's: commit expires what it holds
            written += 1
        return written


class Snapshotter:
    """The projector's snapshot writer: counts each tenant's archived input events and, once a tenant has
    `every_events` of them since its last look, writes its due snapshots, at most `per_batch_max` a batch."""

    def __init__(
        self,
        session_factory: Callable[[], AsyncSession],
        every_events: int,
        clock_ms: Callable[[], int],
        per_batch_max: int = SNAPSHOTS_PER_BATCH_MAX,
    ) -> None:
        assert every_events >= 1, "every_events must be positive"
        assert per_batch_max >= 1, "per_batch_max must be positive"
        self.session_factory = session_factory
        self.every_events = every_events
        self.clock_ms = clock_ms
        self.per_batch_max = per_batch_max
        self.pending: dict[str, int] = {}  # tenant -> archived input events since its last look
        self.written = 0

    @classmethod
    def of(
        cls,
        session_factory: Callable[[], AsyncSession],
        every_events: int | None,
        clock_ms: Callable[[], int],
    ) -> Snapshotter:
        """Every `every_events`, or TOLLGATE_AUDIT_SNAPSHOT_EVERY_EVENTS (AuditSettings) when None."""
        if every_events is None:
            every_events = AuditSettings().snapshot_every_events
        return cls(session_factory, every_events, clock_ms)

    async def after_batch(self, event_rows: Iterable[dict]) -> int:
        """After a batch's rows committed: note its input events per tenant, write the due snapshots."""
        for row in event_rows:
            if row["event_type"] in INPUT_EVENT_TYPES:
                self.pending[row["tenant_id"]] = self.pending.get(row["tenant_id"], 0) + 1
        due = sorted(
            (tenant_id for tenant_id, count in self.pending.items() if count >= self.every_events),
            key=lambda tenant_id: -self.pending[tenant_id],
        )
        budget = self.per_batch_max
        for tenant_id in due:
            if budget == 0:
                break
            written = await snapshot_tenant(
                self.session_factory, tenant_id, self.every_events, self.clock_ms(), budget
            )
            budget -= written
            self.written += written
            if written == 0 or budget > 0:
                del self.pending[tenant_id]  # caught up (or no cut yet): look again after more events
        return self.per_batch_max - budget
