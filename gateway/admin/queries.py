"""Admin reads: a tenant's balance at any time (folded from the event archive) and its entries."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from fastapi import HTTPException
from sqlalchemy import func, select, true
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.admin.models import BalanceView, CreditBlockView, EntriesPage, PendingGrantView
from ledger.codec import decode_input_event
from ledger.events import InvalidEvent
from ledger.pending import pending_grants
from ledger.tenant import TenantLedger
from storage.projections import LedgerEntry, LedgerEvent
from storage.snapshots import (
    AuditSnapshot,
    SnapshotStale,
    archive_reads,
    decoded_events,
    events_known_after,
    folded_on,
    latest_snapshot,
)

logger = logging.getLogger(__name__)

INPUT_EVENT_TYPES = ("credit_granted", "grant_voided", "usage_recorded")
FOLD_BATCH_SIZE = 1_000


def known_by(column_known: Any, column_recorded: Any, as_known_at_ms: int | None) -> Any:
    """Rows the ledger knew by K: their knowledge time (the log's append time; for rows projected before
    it was kept, when the projector wrote them) at or before K. Every row when K is None."""
    return (
        true() if as_known_at_ms is None else func.coalesce(column_known, column_recorded) <= as_known_at_ms
    )


async def balance_at(
    session: AsyncSession,
    tenant_id: str,
    at_ms: int,
    events_max: int,
    as_known_at_ms: int | None = None,
    render: Callable[[TenantLedger, int], Any] | None = None,
) -> Any:
    """Fold every archived input event of the tenant (in any order: the fold does not care) and ask at T;
    with K (`as_known_at_ms`), only the events the log had accepted by K: the ledger as it stood at K.

    Exact for any T, past or present, for the events archived so far. From the latest snapshot usable at
    K plus the events known after it when there is one (storage.snapshots), else from the whole archive.
    `render(ledger, at_ms)` makes the answer from the folded ledger (default: the BalanceView).
    """
    render = render or _balance_view
    snapshot = await latest_snapshot(session, tenant_id, as_known_at_ms)
    if snapshot is not None:
        try:
            return await _balance_from_snapshot(session, snapshot, at_ms, events_max, as_known_at_ms, render)
        except SnapshotStale as stale:
            logger.warning("balance of %s: snapshot not usable (%s), folding the archive", tenant_id, stale)
    ledger = TenantLedger(tenant_id)
    payloads = await session.stream_scalars(
        select(LedgerEvent.payload)
        .where(
            LedgerEvent.tenant_id == tenant_id,
            LedgerEvent.event_type.in_(INPUT_EVENT_TYPES),
            known_by(LedgerEvent.known_at_ms, LedgerEvent.recorded_at_ms, as_known_at_ms),
        )
        .limit(events_max + 1)
        .execution_options(yield_per=FOLD_BATCH_SIZE)
    )
    folded = 0
    async for chunk in payloads.partitions(FOLD_BATCH_SIZE):
        folded += len(chunk)
        if folded > events_max:
            raise HTTPException(
                503,
                detail={
                    "field": None,
                    "message": f"the balance needs more than balance_events_max={events_max} events",
                },
            )
        # Off the request loop: a thread folds each chunk while the loop serves other requests (a busy
        # tenant's archive is seconds of CPU; the completion routes share this loop).
        await asyncio.to_thread(_fold_chunk, ledger, chunk)
    return await asyncio.to_thread(render, ledger, at_ms)


async def _balance_from_snapshot(
    session: AsyncSession,
    snapshot: AuditSnapshot,
    at_ms: int,
    events_max: int,
    as_known_at_ms: int | None,
    render: Callable[[TenantLedger, int], Any],
) -> Any:
    rows = await events_known_after(
        session, snapshot.tenant_id, snapshot.known_through_ms, as_known_at_ms, events_max + 1
    )
    if len(rows) > events_max:
        raise SnapshotStale(f"more than balance_events_max={events_max} events after the snapshot")
    events = decoded_events(snapshot.tenant_id, [payload for _, _, payload in rows])
    # In worker threads: the fold's and the render's archive reads wait there for this loop to run them
    # (at most EDGE_READS_MAX in all, then SnapshotStale: the caller folds the archive instead).
    reads = archive_reads(session, snapshot)
    ledger = await asyncio.to_thread(folded_on, snapshot, reads, events)
    return await asyncio.to_thread(render, ledger, at_ms)


def _fold_chunk(ledger: TenantLedger, payloads: Sequence[dict]) -> None:
    for payload in payloads:
        try:
            ledger.apply(decode_input_event(msgspec.json.encode(payload)))
        except InvalidEvent as error:  # e.g. a grant id reused with other terms: the fold rejects it
            logger.warning("balance of %s: skipping archived event: %s", ledger.tenant_id, error.reason)


def _balance_view(ledger: TenantLedger, at_ms: int) -> BalanceView:
    tenant_id = ledger.tenant_id
    blocks = [
        CreditBlockView(
            grant_id=block.grant_id,
            amount=block.amount,
            remaining=block.remaining,
            effective_at=block.effective_at,
            expires_at=block.expires_at,
            priority=block.priority,
            models=list(block.models),
        )
        for block in ledger.blocks_at(at_ms)
    ]
    settled = ledger.balance_at(at_ms)
    pending = [
        PendingGrantView(
            grant_id=grant.grant_id,
            amount=grant.amount,
            effective_at=grant.effective_at,
            expires_at=grant.expires_at,
        )
        for grant in pending_grants(ledger.account.blocks.values(), at_ms)
    ]
    return BalanceView(
        tenant_id=tenant_id,
        at=at_ms,
        balance=settled,
        settled=settled,
        pending_total=sum(grant.amount for grant in pending),
        pending=pending,
        overage=ledger.overage_at(at_ms),
        blocks=blocks,
    )


async def open_holds(app: Any, tenant_id: str) -> int | None:
    """The tenant's open holds as the admission of this app counts them (fast mode: this process's;
    strict mode: every gateway's, from Postgres); None when this app admits no requests."""
    runtime = getattr(app.state, "runtime", None)
    admission = getattr(runtime, "admission", None)
    held = getattr(admission, "held", None)
    return None if held is None else await held(tenant_id)


def entry_view(sequence: int, entry_id: str, payload: dict) -> dict:
    """The entry as published, plus its `sequence`, its `entry_id` (credit_expired calls it event_id)
    and, for usage, `request_id` (the usage event's id)."""
    view = {"sequence": sequence, **payload, "entry_id": entry_id}
    if payload.get("type") == "usage_allocated":
        view["request_id"] = payload["event_id"]
    return view


async def entries_page(
    session: AsyncSession, tenant_id: str, since: int, limit: int, as_known_at_ms: int | None = None
) -> EntriesPage:
    """Entries recorded after sequence `since`, oldest first (with K, only those published by K). A
    sequence cursor, not a time one, so that a correction recorded late for an early time is never
    skipped by a reader that polls."""
    rows = (
        await session.execute(
            select(LedgerEntry.sequence, LedgerEntry.entry_id, LedgerEntry.payload)
            .where(
                LedgerEntry.tenant_id == tenant_id,
                LedgerEntry.sequence > since,
                known_by(LedgerEntry.known_at_ms, LedgerEntry.recorded_at_ms, as_known_at_ms),
            )
            .order_by(LedgerEntry.sequence)
            .limit(limit + 1)
        )
    ).all()
    page = rows[:limit]
    return EntriesPage(
        tenant_id=tenant_id,
        entries=[entry_view(*row) for row in page],
        next_since=page[-1][0] if page else since,
        has_more=len(rows) > limit,
    )
