"""Point-in-time answers from fold snapshots (storage.snapshots, streams.snapshotter's cut) equal the full
fold's, for random histories with late events and random (T, K): the snapshot used is the latest with
K_s <= K, the events known in (K_s, K] are folded on top, and edges of the usage sample are read from the
archive as the gateway reads them (here an in-memory archive)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import storage.snapshots as snapshots
from ledger.events import CreditGranted, GrantVoided, InvalidEvent, UsageRecorded
from ledger.snapshot import account_to_bytes
from ledger.tenant import TenantLedger
from storage.snapshots import (
    EdgeNeeded,
    SnapshotStale,
    check_edge,
    folded_on,
    interval_bounds,
    merged_sample,
    sample_from_bytes,
    sample_to_bytes,
)
from streams.snapshotter import cut, first_snapshot

TENANT = "t-snap"


@st.composite
def histories(draw):
    """(event, knowledge time) pairs: grants, voids and usage; knowledge time is event time plus a delay
    that is sometimes long (a late event)."""
    events = []
    grant_ids = []
    for index in range(draw(st.integers(1, 4))):
        effective = draw(st.integers(0, 60))
        expires = draw(st.one_of(st.none(), st.integers(effective + 1, 120)))
        grant_id = f"g{index}"
        grant_ids.append(grant_id)
        events.append(
            CreditGranted(
                event_id=f"grant-{index}",
                tenant_id=TENANT,
                grant_id=grant_id,
                amount=draw(st.integers(1, 200)),
                effective_at=effective,
                expires_at=expires,
                priority=draw(st.integers(0, 2)),
            )
        )
    if draw(st.booleans()):
        events.append(
            GrantVoided(
                event_id="void-0",
                tenant_id=TENANT,
                grant_id=draw(st.sampled_from(grant_ids)),
                voided_at=draw(st.integers(0, 120)),
            )
        )
    for index in range(draw(st.integers(0, 60))):
        events.append(
            UsageRecorded(
                event_id=f"use-{index}",
                tenant_id=TENANT,
                amount=draw(st.integers(0, 30)),
                occurred_at=draw(st.integers(0, 120)),
                model="m",
            )
        )
    delays = st.one_of(st.integers(0, 3), st.integers(50, 200))
    return [(event, event.timestamp + draw(delays)) for event in events]


def fold(events) -> TenantLedger:
    ledger = TenantLedger(TENANT)
    for event in events:
        with contextlib.suppress(InvalidEvent):
            ledger.apply(event)
    return ledger


def answer(ledger: TenantLedger, at: int):
    return ledger.balance_at(at), ledger.overage_at(at), ledger.blocks_at(at)


def edge_reader(history, snapshot):
    def read(interval: int):
        sample = sample_from_bytes(snapshot.usage)
        start, end = interval_bounds(sample, interval)
        amounts: dict[int, int] = {}
        for event, known in history:
            known_then = known <= snapshot.known_through_ms
            if type(event) is UsageRecorded and known_then and start <= event.occurred_at < end:
                amounts[event.occurred_at] = amounts.get(event.occurred_at, 0) + event.amount
        return check_edge(sample, interval, amounts)

    return read


def with_edges(read, edges, work):
    """The gateway's `storage.snapshots.with_edges`, synchronous: read each edge asked for, ask again."""
    for _ in range(snapshots.EDGE_READS_MAX):
        try:
            return work(edges)
        except EdgeNeeded as need:
            edges[need.interval] = read(need.interval)
    raise SnapshotStale("too many edges")


def build_snapshots(history, every_events):
    """What streams.snapshotter.snapshot_tenant writes, over the in-memory archive."""
    rows = sorted(((known, event.event_id, event) for event, known in history), key=lambda row: row[:2])
    built = []
    base = first_snapshot(TENANT)
    while True:
        taken = cut(rows, every_events)
        if not taken:
            return built
        events = [event for _, _, event in rows[:taken]]
        ledger = with_edges(
            edge_reader(history, base), {}, lambda edges, b=base, e=events: folded_on(b, edges, e)
        )
        base = snapshots.AuditSnapshot(
            tenant_id=TENANT,
            known_through_ms=rows[taken - 1][0],
            events=base.events + taken,
            account=account_to_bytes(ledger.account),
            usage=sample_to_bytes(merged_sample(sample_from_bytes(base.usage), ledger.index.delta)),
            created_at_ms=0,
        )
        built.append(base)
        rows = rows[taken:]


@pytest.fixture(scope="module")
def small_stride():
    """Sample every 2nd distinct usage time, so that the short histories have edges to read."""
    saved = snapshots.USAGE_STRIDE_TIMES
    snapshots.USAGE_STRIDE_TIMES = 2
    yield
    snapshots.USAGE_STRIDE_TIMES = saved


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    histories(),
    st.integers(1, 8),
    st.lists(st.tuples(st.integers(-5, 130), st.integers(-5, 330)), max_size=6),
)
def test_snapshot_answer_equals_the_full_fold(small_stride, history, every_events, queries):
    built = build_snapshots(history, every_events)
    for at, known_by in queries:
        expected = answer(fold([event for event, known in history if known <= known_by]), at)
        usable = [snapshot for snapshot in built if snapshot.known_through_ms <= known_by]
        if not usable:
            continue
        snapshot = usable[-1]
        delta = sorted(
            (
                (known, event.event_id, event)
                for event, known in history
                if snapshot.known_through_ms < known <= known_by
            ),
            key=lambda row: row[:2],
        )
        read = edge_reader(history, snapshot)
        edges: dict = {}
        late = [event for _, _, event in delta]
        ledger = with_edges(read, edges, lambda found, s=snapshot, e=late: folded_on(s, found, e))
        assert with_edges(read, edges, lambda _, led=ledger, t=at: answer(led, t)) == expected
