"""Writes a tenant's fold snapshots (storage.snapshots): one every `audit_snapshot_every_events` archived
input events, in knowledge order, each built on the previous one.

A snapshot is cut only between two knowledge times (every event known at its K_s is in it) and never at
the tenant's latest knowledge time (an event of that millisecond may still be on its way to the
archive). When the previous snapshot no longer matches the archive (`SnapshotStale`), the tenant's
snapshots are rebuilt from its first event. Run by the projector after a batch (`Snapshotter`) or by
`tollgate audit snapshot`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from ledger.account import Account
from ledger.snapshot import account_to_bytes
from storage.snapshots import (
    EMPTY_SAMPLE,
    AuditSnapshot,
    SnapshotStale,
    decoded_events,
    events_known_after,
    folded_on,
    latest_snapshot,
    merged_sample,
    sample_from_bytes,
    sample_to_bytes,
    with_edges,
)

logger = logging.getLogger(__name__)


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
    session_factory: Callable[[], AsyncSession], tenant_id: str, every_events: int, now_ms: int
) -> int:
    """Writes the tenant's due snapshots; returns how many."""
    written = 0
    async with session_factory() as session:
        base = await latest_snapshot(session, tenant_id, None) or first_snapshot(tenant_id)
        while True:
            after = None if base.known_through_ms < 0 else base.known_through_ms
            rows = await events_known_after(session, tenant_id, after, None, 2 * every_events)
            taken = cut(rows, every_events)
            if not taken:
                return written
            events = decoded_events(tenant_id, [payload for _, _, payload in rows[:taken]])
            try:
                ledger = await with_edges(
                    session, base, lambda edges, b=base, e=events: folded_on(b, edges, e)
                )
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
