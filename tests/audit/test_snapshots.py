"""Point-in-time answers from fold snapshots (storage.snapshots, streams.snapshotter's cut) equal the full
fold's, for random histories with late events and random (T, K): the snapshot used is the latest with
K_s <= K, the events known in (K_s, K] are folded on top, and edges of the usage sample (and, for a tenant
with credits scoped to models, usage by model in a range) are read from the archive as the gateway reads
them (here an in-memory archive). Also for scoped tenants whose first scoped grant is known after a
snapshot and backdated over usage the snapshot holds, and through Postgres: the snapshotter's reads have no
limit (a first scoped grant over many segments with usage), the balance query's fall back to the fold."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

import storage.snapshots as snapshots
from ledger.codec import encode_event
from ledger.events import CreditGranted, GrantVoided, InvalidEvent, UsageRecorded
from ledger.snapshot import account_to_bytes
from ledger.tenant import TenantLedger
from ledger.usage_index import NO_MODEL
from storage.snapshots import (
    ArchiveReads,
    AuditSnapshot,
    EdgeNeeded,
    ModelUsageNeeded,
    SnapshotStale,
    check_edge,
    check_model_usage,
    folded_on,
    interval_bounds,
    merged_sample,
    sample_from_bytes,
    sample_to_bytes,
)
from streams.records import LogRecord
from streams.snapshotter import cut, first_snapshot, snapshot_tenant
from tests.admin.conftest import TOPICS, admin_app, archive_records, client, clock, publisher  # noqa: F401

TENANT = "t-snap"
MODELS = ("m", "n", "o")
SCOPES = ((), ("m",), ("n",), ("m", "n"), ("n", "o"))  # unscoped, single, nested and crossing scopes


@st.composite
def histories(draw, scoped: bool = False):
    """(event, knowledge time) pairs: grants, voids and usage; knowledge time is event time plus a delay
    that is sometimes long (a late event). `scoped`: grants may name models (`SCOPES`), usage is of
    several models."""
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
                models=draw(st.sampled_from(SCOPES)) if scoped else (),
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
                model=draw(st.sampled_from(MODELS)) if scoped else "m",
            )
        )
    delays = st.one_of(st.integers(0, 3), st.integers(50, 200))
    return [(event, event.timestamp + draw(delays)) for event in events]


def fold(events, tenant_id: str = TENANT) -> TenantLedger:
    ledger = TenantLedger(tenant_id)
    for event in events:
        with contextlib.suppress(InvalidEvent):
            ledger.apply(event)
    return ledger


def answer(ledger: TenantLedger, at: int):
    return ledger.balance_at(at), ledger.overage_at(at), ledger.blocks_at(at), ledger.totals_at(at)


class ArchiveReader:
    """The archive reads of `storage.snapshots` (`read_edge`, `read_model_usage`) over an in-memory
    history: the usage known by the snapshot's K_s in a range, by millisecond or by model."""

    def __init__(self, history, snapshot) -> None:
        self.history = history
        self.snapshot = snapshot
        self.sample = sample_from_bytes(snapshot.usage)

    def _usage_in(self, start: int, end: int):
        for event, known in self.history:
            known_then = known <= self.snapshot.known_through_ms
            if type(event) is UsageRecorded and known_then and start <= event.occurred_at < end:
                yield event

    def edge(self, interval: int):
        amounts: dict[int, int] = {}
        for event in self._usage_in(*interval_bounds(self.sample, interval)):
            amounts[event.occurred_at] = amounts.get(event.occurred_at, 0) + event.amount
        return check_edge(self.sample, interval, amounts)

    def model_usage(self, need: ModelUsageNeeded):
        amounts: dict[str, int] = {}
        for event in self._usage_in(need.start, need.end):
            amounts[event.model] = amounts.get(event.model, 0) + event.amount
        return check_model_usage(need, amounts)

    def read(self, need: EdgeNeeded | ModelUsageNeeded):
        """`ArchiveReads.fetch`, synchronous (the gateway's waits for its event loop to read Postgres)."""
        return self.edge(need.interval) if type(need) is EdgeNeeded else self.model_usage(need)

    def reads(self, reads_max=snapshots.EDGE_READS_MAX) -> ArchiveReads:
        """What `storage.snapshots.archive_reads` gives the fold, over this archive."""
        return ArchiveReads(self.read, reads_max)


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
        ledger = folded_on(base, ArchiveReader(history, base).reads(reads_max=None), events)
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


def snapshot_answer(history, snapshot, known_by: int, at: int):
    """The answer at T as known at K from `snapshot` plus the events known in (K_s, K] folded on top, in
    knowledge order, as the balance query makes it (its read limit included), and the reads it made."""
    delta = sorted(
        (
            (known, event.event_id, event)
            for event, known in history
            if snapshot.known_through_ms < known <= known_by
        ),
        key=lambda row: row[:2],
    )
    reads = ArchiveReader(history, snapshot).reads()
    ledger = folded_on(snapshot, reads, [event for _, _, event in delta])
    return answer(ledger, at), reads


def check_snapshot_answers(history, every_events, queries) -> None:
    built = build_snapshots(history, every_events)
    for at, known_by in queries:
        expected = answer(fold([event for event, known in history if known <= known_by]), at)
        usable = [snapshot for snapshot in built if snapshot.known_through_ms <= known_by]
        if usable:
            assert snapshot_answer(history, usable[-1], known_by, at)[0] == expected


QUERIES = st.lists(st.tuples(st.integers(-5, 130), st.integers(-5, 330)), max_size=6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), st.integers(1, 8), QUERIES)
def test_snapshot_answer_equals_the_full_fold(small_stride, history, every_events, queries):
    check_snapshot_answers(history, every_events, queries)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(scoped=True), st.integers(1, 8), QUERIES)
def test_scoped_snapshot_answer_equals_the_full_fold(small_stride, history, every_events, queries):
    """Grants scoped to models (nested and crossing scopes) and usage of several models: the answers,
    usage by model read from the archive where the snapshot holds usage, equal the full fold's."""
    check_snapshot_answers(history, every_events, queries)


def late_first_scope_history(tenant_id: str, usage_events: int, rng: random.Random, grants: int = 1):
    """Usage of models m and n over [0, 1000), known at once, drawn from `grants` unscoped grants (each
    with its own effective and expiry times: segments); then, known at 5,000, the tenant's first grant
    scoped to m, backdated to 0: it takes the m usage that earlier snapshots already hold."""
    history = []
    for index in range(grants):
        effective = 1_000 * index // grants
        history.append(
            (
                CreditGranted(
                    event_id=f"grant-{index}",
                    tenant_id=tenant_id,
                    grant_id=f"g{index}",
                    amount=40,
                    effective_at=effective,
                    expires_at=effective + 1_000 // grants + 3,
                ),
                effective,
            )
        )
    for index in range(usage_events):
        at = rng.randrange(0, 1_000)
        model = rng.choice(("m", "n"))
        usage = UsageRecorded(
            event_id=f"use-{index}",
            tenant_id=tenant_id,
            amount=rng.randrange(1, 30),
            occurred_at=at,
            model=model,
        )
        history.append((usage, at + rng.randrange(0, 3)))
    scoped = CreditGranted(
        event_id="grant-scoped", tenant_id=tenant_id, grant_id="gs", amount=700, effective_at=0, models=("m",)
    )
    history.append((scoped, 5_000))
    return history


def test_a_late_first_scoped_grant_takes_usage_a_snapshot_already_holds(small_stride):
    """The case that motivated reading usage by model from the archive: every usage is in the snapshots
    cut before the tenant's first scoped grant is known; the grant is backdated over it. Folded on the
    last of those snapshots, the grant takes the m usage (read by model from the archive), exactly as the
    full fold in any order does."""
    rng = random.Random(5)
    history = late_first_scope_history(TENANT, 80, rng)
    built = build_snapshots(history, 10)
    before_grant = [snapshot for snapshot in built if snapshot.known_through_ms < 5_000]
    assert before_grant, "no snapshot before the scoped grant"
    snapshot = before_grant[-1]
    in_time_order = fold([event for event, _ in sorted(history, key=lambda pair: pair[0].timestamp)])
    for at in [-1, 0, 1, *rng.sample(range(1_000), 20), 999, 5_000]:
        got, reads = snapshot_answer(history, snapshot, 6_000, at)
        assert got == answer(fold([event for event, _ in history]), at) == answer(in_time_order, at)
        assert reads.model_usage, "the scoped grant did not read usage by model from the archive"
    scoped_block = next(block for block in in_time_order.blocks_at(999) if block.grant_id == "gs")
    assert scoped_block.remaining < 700, "the backdated scoped grant took none of the m usage"


def test_usage_by_model_that_does_not_match_the_snapshot_is_stale():
    """A by-model read is checked against the snapshot's total over its range (every model, no model
    included); a mismatch (the archive gained usage known by K_s after the cut) is SnapshotStale."""
    need = ModelUsageNeeded(0, 10, 7)
    assert check_model_usage(need, {"m": 4, NO_MODEL: 2, "n": 1, "o": 0}) == {"m": 4, "n": 1}
    with pytest.raises(SnapshotStale):
        check_model_usage(need, {"m": 4, "n": 1})


def test_archive_reads_have_a_limit_and_wait_for_the_loop(small_stride, monkeypatch):
    """storage.snapshots.archive_reads: a first scoped grant folded over a snapshot (in a worker thread,
    its reads run on the event loop) reads usage by model once per segment with usage; past `reads_max`
    the answer gives up (SnapshotStale), with no limit (the snapshotter's) it completes, equal to the full
    fold, having folded once (each read is made once, where the fold needs it). A read that does not
    match the snapshot raises SnapshotStale out of the worker."""
    rng = random.Random(9)
    history = late_first_scope_history(TENANT, 400, rng, grants=50)
    built = build_snapshots(history, 50)  # reads as the snapshotter does: with no limit
    snapshot = [snapshot for snapshot in built if snapshot.known_through_ms < 5_000][-1]
    late = [event for event, known in history if known > snapshot.known_through_ms]
    assert any(type(event) is CreditGranted and event.models for event in late)
    archive = [ArchiveReader(history, snapshot)]

    async def read_edge(session, snap, sample, interval):
        return archive[0].edge(interval)

    async def read_model_usage(session, snap, need):
        return archive[0].model_usage(need)

    monkeypatch.setattr(snapshots, "read_edge", read_edge)
    monkeypatch.setattr(snapshots, "read_model_usage", read_model_usage)

    folds = []

    async def fold_over_snapshot(reads_max):
        reads = snapshots.archive_reads(None, snapshot, reads_max)
        folds.append(reads)
        return await asyncio.to_thread(lambda: answer(folded_on(snapshot, reads, late), 999))

    with pytest.raises(SnapshotStale):
        asyncio.run(fold_over_snapshot(snapshots.EDGE_READS_MAX))
    assert folds[-1].done == snapshots.EDGE_READS_MAX
    expected = answer(fold([event for event, _ in history]), 999)
    assert asyncio.run(fold_over_snapshot(None)) == expected
    reads = folds[-1]
    assert len(reads.model_usage) > snapshots.EDGE_READS_MAX
    assert reads.done == len(reads.model_usage) + len(reads.edges)
    with pytest.raises(AssertionError, match="block"):  # a read on the loop itself would block it

        async def on_the_loop():
            folded_on(snapshot, snapshots.archive_reads(None, snapshot, None), late)

        asyncio.run(on_the_loop())
    missed = UsageRecorded(event_id="missed", tenant_id=TENANT, amount=5, occurred_at=500, model="n")
    archive[0] = ArchiveReader([*history, (missed, 0)], snapshot)  # archived after the snapshot was cut
    with pytest.raises(SnapshotStale, match="differs from the snapshot"):
        asyncio.run(fold_over_snapshot(None))


async def test_scoped_snapshots_through_postgres(client, session_factory, monkeypatch):  # noqa: F811
    """The snapshotter writes a scoped tenant's snapshots from the archive, the first scoped grant known
    late and needing more by-model reads than the balance query's limit (it does not give up and rebuild
    forever), and `balance?at=T&as_known_at=K` answers equal the full fold's (from a snapshot, or from the
    archive where the query's reads would pass its limit)."""
    monkeypatch.setattr(snapshots, "USAGE_STRIDE_TIMES", 3)
    tenant_id = (await client.post("/admin/v1/tenants", json={"name": "Scoped", "tier": "pro"})).json()[
        "tenant_id"
    ]
    rng = random.Random(21)
    history = late_first_scope_history(tenant_id, 300, rng, grants=45)
    for index in range(40):  # usage after the scoped grant is known, some of it late
        at = rng.randrange(0, 1_000)
        usage = UsageRecorded(
            event_id=f"after-{index}",
            tenant_id=tenant_id,
            amount=rng.randrange(1, 30),
            occurred_at=at,
            model=rng.choice(MODELS),
        )
        history.append((usage, 5_000 + index * 10))
    records = [
        LogRecord(TOPICS.events, 0, offset, tenant_id.encode(), encode_event(event), known)
        for offset, (event, known) in enumerate(history)
    ]
    await archive_records(session_factory, records)
    model_reads: list[ModelUsageNeeded] = []
    read_model_usage = snapshots.read_model_usage

    async def counted(session, snapshot, need):
        model_reads.append(need)
        return await read_model_usage(session, snapshot, need)

    monkeypatch.setattr(snapshots, "read_model_usage", counted)
    written = await asyncio.wait_for(snapshot_tenant(session_factory, tenant_id, 25, now_ms=0), 120)
    assert written >= 12
    assert len(model_reads) > snapshots.EDGE_READS_MAX, "the first scoped grant read too little to test"
    model_reads.clear()
    async with session_factory() as session:
        query = select(AuditSnapshot.known_through_ms).where(AuditSnapshot.tenant_id == tenant_id)
        known = (await session.scalars(query)).all()
    assert len(known) == written and max(known) > 5_000, "no snapshot after the scoped grant"
    for _ in range(40):
        at, known_by = (
            rng.randrange(0, 1_100),
            rng.choice([rng.randrange(0, 1_100), rng.randrange(5_000, 5_500)]),
        )
        ledger = fold([event for event, known in history if known <= known_by], tenant_id)
        ledger_at = (ledger.balance_at(at), ledger.overage_at(at))
        response = await client.get(
            f"/admin/v1/tenants/{tenant_id}/balance", params={"at": at, "as_known_at": known_by}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["balance"], body["overage"]) == ledger_at
        assert [(block["grant_id"], block["remaining"]) for block in body["blocks"]] == [
            (block.grant_id, block.remaining) for block in ledger.blocks_at(at)
        ]
    assert model_reads, "no answer read usage by model from the archive"


async def test_archive_reads_take_amounts_beyond_32_bits(client, session_factory, monkeypatch):  # noqa: F811
    """Usage amounts go up to 2**62 (ledger.events.AMOUNT_MAX): the edge and usage-by-model reads sum them
    as 64-bit integers (a cast to `integer` failed above 2**31 - 1)."""
    monkeypatch.setattr(snapshots, "USAGE_STRIDE_TIMES", 3)
    tenant_id = (await client.post("/admin/v1/tenants", json={"name": "Large", "tier": "pro"})).json()[
        "tenant_id"
    ]
    rng = random.Random(7)
    large = 2**33
    history = [
        (
            CreditGranted(
                event_id="g-any", tenant_id=tenant_id, grant_id="g-any", amount=2**45, effective_at=0
            ),
            0,
        )
    ]
    for index in range(60):
        at = rng.randrange(0, 1_000)
        usage = UsageRecorded(
            event_id=f"big-{index}",
            tenant_id=tenant_id,
            amount=large + rng.randrange(0, 1_000),
            occurred_at=at,
            model=rng.choice(("m", "n")),
        )
        history.append((usage, at + rng.randrange(0, 3)))
    scoped = CreditGranted(
        event_id="g-m", tenant_id=tenant_id, grant_id="g-m", amount=2**40, effective_at=0, models=("m",)
    )
    history.append((scoped, 5_000))  # the first scoped grant, known late: usage by model is read
    records = [
        LogRecord(TOPICS.events, 0, offset, tenant_id.encode(), encode_event(event), known)
        for offset, (event, known) in enumerate(history)
    ]
    await archive_records(session_factory, records)
    assert await snapshot_tenant(session_factory, tenant_id, 10, now_ms=0) >= 5
    for at, known_by in [(rng.randrange(0, 1_000), rng.choice([400, 900, 5_000])) for _ in range(20)]:
        ledger = fold([event for event, known in history if known <= known_by], tenant_id)
        response = await client.get(
            f"/admin/v1/tenants/{tenant_id}/balance", params={"at": at, "as_known_at": known_by}
        )
        assert response.status_code == 200, response.text
        assert (response.json()["balance"], response.json()["overage"]) == (
            ledger.balance_at(at),
            ledger.overage_at(at),
        )
