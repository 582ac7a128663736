"""The on-disk processor state (streams.state_store): the same contract as the in-memory state and the
in-memory usage index, plus what only the disk has (restore from the changelog, roll back after a
crash between writes, a bounded cache)."""

from __future__ import annotations

import fcntl
import os

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.account import NEVER, Account
from ledger.events import CreditGranted, GrantVoided, UsageRecorded
from ledger.tenant import TenantLedger
from ledger.usage_index import InMemoryUsageIndex, UsageSummary
from streams.batch_processor import PartitionedState
from streams.processor import SeenRecord, seen_batch_key
from streams.state_store import RocksState


def seen_batch(tenant_id: str, records: list[SeenRecord]) -> tuple[bytes, bytes]:
    """A seen-id batch as the processor writes it to the changelog."""
    return seen_batch_key(tenant_id, records[0].offset), msgspec.msgpack.encode(records)


@pytest.fixture
def rocks_state(tmp_path):
    state = RocksState(tmp_path / "state")
    yield state
    state.close()


# ------------------------------------------------------------------------------ state contract


@pytest.fixture(params=["in_memory", "rocksdb"])
def state(request, tmp_path):
    if request.param == "in_memory":
        yield PartitionedState()
        return
    store = RocksState(tmp_path / "state")
    yield store
    store.close()


def test_state_get_put_and_overwrite(state):
    assert state.get(b"a/acme") is None
    state.put(0, b"a/acme", b"1")
    state.put(0, b"a/acme", b"2")
    assert state.get(b"a/acme") == b"2"
    assert len(state) == 1


def test_state_items_with_prefix_are_exactly_the_prefixed_keys(state):
    state.put(0, b"a/acme", b"1")
    state.put(1, b"a/globex", b"2")
    state.put(1, b"ab", b"3")
    state.put(1, b"b/x", b"4")
    assert dict(state.items_with_prefix(b"a/")) == {b"a/acme": b"1", b"a/globex": b"2"}
    assert dict(state.items_with_prefix(b"a")) == {b"a/acme": b"1", b"a/globex": b"2", b"ab": b"3"}
    assert dict(state.items_with_prefix(b"c")) == {}


def test_state_tombstone_removes_a_key(state):
    key, value = seen_batch("globex", [SeenRecord("g1", 1, 100, 9)])
    state.put(1, key, value)
    state.put(1, b"a/globex", b"2")
    assert state.get(key) == value
    state.put(1, key, None)
    state.put(1, b"a/globex", None)
    assert state.get(key) is None and state.get(b"a/globex") is None
    assert dict(state.items_with_prefix(b"")) == {}


def test_state_drop_forgets_one_partition_only(state):
    state.put(0, b"a/acme", b"1")
    state.put(1, b"a/globex", b"2")
    state.put(1, b"x/globex", b"3")
    state.drop(1)
    assert state.get(b"a/globex") is None and state.get(b"x/globex") is None
    assert state.get(b"a/acme") == b"1" and len(state) == 1
    state.put(1, b"a/globex", b"4")  # taken over again later
    assert state.get(b"a/globex") == b"4"


def test_state_iteration_survives_writes_during_it(state):
    for n in range(5):
        state.put(0, b"a/t%d" % n, b"%d" % n)
    seen = []
    for key, _ in state.items_with_prefix(b"a/"):
        seen.append(key)
        state.put(0, b"a/z" + key, b"new")
    assert len(seen) >= 5


# ------------------------------------------------------------------------------ usage index contract


class DiskIndexDriver:
    """Drives a `DiskUsageIndex` as the processor and engine do: each record at a new source offset, its
    seen batch written to the store after `records_per_batch` records (never, when None)."""

    def __init__(self, store: RocksState, tenant_id: str, records_per_batch: int | None) -> None:
        self.store = store
        self.tenant_id = tenant_id
        self.view = store.usage_indexes.open(tenant_id, applied_offset=-1)
        self.records_per_batch = records_per_batch
        self.unwritten: list[SeenRecord] = []
        self.next_offset = 0

    def seen(self, event_id: str) -> bool:
        self.view.current_offset = self.next_offset
        return self.view.seen(event_id)

    def record(self, event_id: str, occurred_at: int, amount: int, model: str) -> None:
        self.view.current_offset = self.next_offset
        self.view.record(event_id, occurred_at, amount, model)
        self.unwritten.append(SeenRecord(event_id, self.next_offset, occurred_at, amount, model))
        self.next_offset += 1
        if self.records_per_batch is not None and len(self.unwritten) >= self.records_per_batch:
            self.store.put(0, *seen_batch(self.tenant_id, self.unwritten))
            self.unwritten = []

    def usage_between(self, start: int, end: int) -> UsageSummary:
        return self.view.usage_between(start, end)

    def usage_by_model_between(self, start: int, end: int) -> dict[str, int]:
        return self.view.usage_by_model_between(start, end)


@pytest.fixture(params=["in_memory", "disk_unwritten", "disk_each_written", "disk_batches_of_3"])
def usage_index(request, tmp_path):
    if request.param == "in_memory":
        yield InMemoryUsageIndex()
        return
    store = RocksState(tmp_path / "state")
    per_batch = {"disk_unwritten": None, "disk_each_written": 1, "disk_batches_of_3": 3}[request.param]
    yield DiskIndexDriver(store, "acme", per_batch)
    store.close()


def test_usage_index_seen_after_record(usage_index):
    assert not usage_index.seen("u1")
    usage_index.record("u1", 10, 5, "m")
    assert usage_index.seen("u1")
    assert not usage_index.seen("u2")


def test_usage_index_window_is_half_open_with_first_and_last(usage_index):
    for n, (at, amount) in enumerate([(10, 5), (20, 7), (20, 1), (30, 0), (40, 2)]):
        usage_index.record(f"u{n}", at, amount, "m")
    assert usage_index.usage_between(10, 40) == UsageSummary(13, 10, 30)  # zero-amount usage has a time
    assert usage_index.usage_between(11, 20) == UsageSummary(0, None, None)
    assert usage_index.usage_between(20, 21) == UsageSummary(8, 20, 20)
    assert usage_index.usage_between(-NEVER, NEVER) == UsageSummary(15, 10, 40)
    assert usage_index.usage_between(40, 40) == UsageSummary(0, None, None)


def test_usage_index_out_of_order_records(usage_index):
    for n, at in enumerate([50, 10, 30, 20, 40]):
        usage_index.record(f"u{n}", at, at, "m")
    assert usage_index.usage_between(15, 45) == UsageSummary(90, 20, 40)


def test_usage_index_sums_usage_by_model(usage_index):
    """Each usage's model is kept: several models in one millisecond, zero amounts left out."""
    for n, (at, amount, model) in enumerate(
        [(10, 5, "a"), (10, 2, "b"), (10, 1, "a"), (20, 0, "c"), (30, 4, "b")]
    ):
        usage_index.record(f"u{n}", at, amount, model)
    assert usage_index.usage_by_model_between(10, 11) == {"a": 6, "b": 2}
    assert usage_index.usage_by_model_between(-NEVER, NEVER) == {"a": 6, "b": 6}
    assert usage_index.usage_by_model_between(11, 30) == {}  # zero-amount usage of c: no total
    assert usage_index.usage_by_model_between(11, 31) == {"b": 4}


records_strategy = st.lists(
    st.tuples(st.integers(0, 60), st.integers(0, 50), st.sampled_from(["a", "b", "c"])),
    min_size=0,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(
    records=records_strategy,
    windows=st.lists(st.tuples(st.integers(-5, 70), st.integers(-5, 70)), max_size=10),
    per_batch=st.sampled_from([None, 1, 4]),
)
def test_disk_usage_index_answers_as_the_in_memory_one(tmp_path_factory, records, windows, per_batch):
    store = RocksState(tmp_path_factory.mktemp("state"))
    try:
        disk = DiskIndexDriver(store, "acme", per_batch)
        memory = InMemoryUsageIndex()
        for n, (at, amount, model) in enumerate(records):
            memory.record(f"u{n}", at, amount, model)
            disk.record(f"u{n}", at, amount, model)
        for start, end in windows + [(-NEVER, NEVER)]:
            assert disk.usage_between(start, end) == memory.usage_between(start, end), (start, end)
            by_model = disk.usage_by_model_between(start, end)
            assert by_model == memory.usage_by_model_between(start, end), (start, end)
    finally:
        store.close()


# ------------------------------------------------------------------------------ disk only


def test_restored_from_the_changelog_on_takeover(tmp_path):
    """Another process reads the changelog back into a fresh store: the index follows the seen batches."""
    changelog = [
        (b"a/acme", b"snapshot"),
        seen_batch("acme", [SeenRecord("u1", 3, 100, 5, "a"), SeenRecord("u2", 4, 150, 7, "b")]),
        seen_batch("acme", [SeenRecord("u3", 9, 120, 1)]),  # written before seen records had models
    ]
    store = RocksState(tmp_path / "taker")
    try:
        for key, value in changelog:
            store.put(2, key, value)
        view = store.usage_indexes.open("acme", applied_offset=9)
        view.current_offset = 20
        assert view.seen("u1") and view.seen("u3") and not view.seen("u4")
        assert view.usage_between(0, 1000) == UsageSummary(13, 100, 150)
        assert view.usage_between(101, 150) == UsageSummary(1, 120, 120)
        assert view.usage_by_model_between(0, 1000) == {"a": 5, "b": 7}  # u3: usage of no model
    finally:
        store.close()


def test_batches_after_the_snapshot_are_rolled_back_and_redelivery_counts_once(rocks_state):
    """A crash after a seen batch was written and before the account snapshot: the snapshot says offset 4."""
    rocks_state.put(0, *seen_batch("acme", [SeenRecord("u1", 3, 100, 5), SeenRecord("u2", 4, 150, 7)]))
    rocks_state.put(0, *seen_batch("acme", [SeenRecord("u3", 9, 120, 1), SeenRecord("u4", 10, 160, 2)]))
    view = rocks_state.usage_indexes.open("acme", applied_offset=4)
    assert view.usage_between(0, 1000) == UsageSummary(12, 100, 150)
    view.current_offset = 9  # u3 redelivered at its own offset: not a duplicate
    assert not view.seen("u3")
    view.record("u3", 120, 1, "m")
    view.current_offset = 10
    view.record("u4", 160, 2, "m")
    rocks_state.put(0, *seen_batch("acme", [SeenRecord("u3", 9, 120, 1), SeenRecord("u4", 10, 160, 2)]))
    assert view.pending_count() == 0
    assert view.usage_between(0, 1000) == UsageSummary(15, 100, 160)
    view.current_offset = 11  # the same usage produced again (another offset): a duplicate
    assert view.seen("u3")


def test_records_after_the_snapshot_are_rolled_back_inside_a_batch_too(rocks_state):
    rocks_state.put(0, *seen_batch("acme", [SeenRecord("u1", 3, 100, 5), SeenRecord("u2", 6, 150, 7)]))
    view = rocks_state.usage_indexes.open("acme", applied_offset=4)
    view.current_offset = 6
    assert not view.seen("u2")
    view.current_offset = 7
    assert view.seen("u1")
    assert view.usage_between(0, 1000) == UsageSummary(5, 100, 100)


def test_a_record_in_two_batches_counts_once(rocks_state):
    """A crash, then a refold with other batch boundaries: the same event at the same offset twice."""
    rocks_state.put(0, *seen_batch("acme", [SeenRecord("u1", 3, 100, 5)]))
    rocks_state.put(0, *seen_batch("acme", [SeenRecord("u2", 4, 120, 1)]))
    rocks_state.put(0, *seen_batch("acme", [SeenRecord("u1", 3, 100, 5), SeenRecord("u2", 4, 120, 1)]))
    view = rocks_state.usage_indexes.open("acme", applied_offset=4)
    assert view.usage_between(0, 1000) == UsageSummary(6, 100, 120)


def test_a_rewritten_batch_replaces_its_old_records(rocks_state):
    """The changelog key of a batch is its first offset: a redelivery split differently overwrites it."""
    rocks_state.put(0, *seen_batch("acme", [SeenRecord("u1", 3, 100, 5), SeenRecord("u2", 4, 150, 7)]))
    rocks_state.put(0, *seen_batch("acme", [SeenRecord("u1", 3, 100, 5)]))
    view = rocks_state.usage_indexes.open("acme", applied_offset=3)
    view.current_offset = 4
    assert not view.seen("u2")
    assert view.usage_between(0, 1000) == UsageSummary(5, 100, 100)


def test_unwritten_records_are_forgotten_when_the_tenant_is_opened_again(rocks_state):
    """A batch the broker refused: the processor forgets its tenants and folds the batch again."""
    view = rocks_state.usage_indexes.open("acme", applied_offset=-1)
    view.current_offset = 0
    view.record("u1", 100, 5, "m")
    reopened = rocks_state.usage_indexes.open("acme", applied_offset=-1)
    reopened.current_offset = 0
    assert not reopened.seen("u1")
    assert reopened.usage_between(0, 1000) == UsageSummary(0, None, None)


def test_a_tombstoned_batch_leaves_the_index(rocks_state):
    key, value = seen_batch("acme", [SeenRecord("u1", 3, 100, 5)])
    rocks_state.put(0, key, value)
    rocks_state.put(0, key, None)
    view = rocks_state.usage_indexes.open("acme", applied_offset=3)
    view.current_offset = 10
    assert not view.seen("u1") and view.usage_between(0, 1000) == UsageSummary(0, None, None)


def test_drop_forgets_the_index_of_that_partition_only(rocks_state):
    rocks_state.put(0, *seen_batch("acme", [SeenRecord("u1", 3, 100, 5)]))
    rocks_state.put(1, *seen_batch("globex", [SeenRecord("g1", 3, 100, 9)]))
    rocks_state.drop(1)
    acme = rocks_state.usage_indexes.open("acme", applied_offset=3)
    globex = rocks_state.usage_indexes.open("globex", applied_offset=3)
    acme.current_offset = globex.current_offset = 10
    assert acme.seen("u1") and not globex.seen("g1")
    assert globex.usage_between(0, 1000) == UsageSummary(0, None, None)
    assert dict(rocks_state.items_with_prefix(b"s/globex/")) == {}


def test_a_seen_batch_rewritten_within_one_chunk_keeps_only_its_last_records(rocks_state):
    """A changelog read back in chunks: a crash wrote a tenant's batch at offset 9 with two records, the
    refold rewrote it with one; both land in the same `put_all`. Simulation seed 620 found this."""
    rocks_state.put_all(
        0,
        [
            seen_batch("acme", [SeenRecord("u2", 9, 238, 4), SeenRecord("u4", 12, 117, 5)]),
            seen_batch("acme", [SeenRecord("u2", 9, 238, 4)]),
        ],
    )
    view = rocks_state.usage_indexes.open("acme", applied_offset=12)
    view.current_offset = 20
    assert view.seen("u2") and not view.seen("u4")
    assert view.usage_between(0, 1_000) == UsageSummary(4, 238, 238)


def test_the_seen_cache_is_bounded_and_the_disk_still_answers(tmp_path):
    store = RocksState(tmp_path / "state", seen_cache_entries_max=3)
    try:
        records = [SeenRecord(f"u{n}", n, 100 + n, 1) for n in range(50)]
        store.put(0, *seen_batch("acme", records))
        assert len(store.usage_indexes.cache) == 0  # filled by ids found on disk, not by writes
        view = store.usage_indexes.open("acme", applied_offset=49)
        view.current_offset = 100
        assert all(view.seen(f"u{n}") for n in range(50))
        assert len(store.usage_indexes.cache) == 3
    finally:
        store.close()


class CountingDb:
    """The store's RocksDB, counting point reads."""

    def __init__(self, db) -> None:
        self.db = db
        self.gets = 0

    def get(self, key):
        self.gets += 1
        return self.db.get(key)

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_new_usage_ids_are_known_unseen_without_a_disk_read(tmp_path):
    store = RocksState(tmp_path / "state")
    try:
        store.put(0, *seen_batch("acme", [SeenRecord(f"u{n}", n, 100 + n, 1) for n in range(1_000)]))
        counting = store.usage_indexes.db = CountingDb(store.usage_indexes.db)
        view = store.usage_indexes.open("acme", applied_offset=999)
        view.current_offset = 5_000
        assert not any(view.seen(f"new-{n}") for n in range(1_000))
        assert counting.gets <= 5, f"{counting.gets} disk reads for 1,000 new ids (the filter should answer)"
        assert all(view.seen(f"u{n}") for n in range(0, 1_000, 10)) and counting.gets >= 100
    finally:
        store.close()


def test_a_saturated_filter_still_answers_exactly_from_the_disk(tmp_path):
    """A filter of 8 bits says "maybe" for nearly every id: the answers come from the disk, and stay right."""
    store = RocksState(tmp_path / "state", seen_filter_bytes=1, seen_cache_entries_max=1)
    try:
        store.put(0, *seen_batch("acme", [SeenRecord(f"u{n}", n, 100 + n, 1) for n in range(200)]))
        view = store.usage_indexes.open("acme", applied_offset=199)
        view.current_offset = 500
        assert all(view.seen(f"u{n}") for n in range(200))
        assert not any(view.seen(f"new-{n}") for n in range(200))
    finally:
        store.close()


def test_a_claimed_directory_wipes_those_of_dead_processes_and_leaves_live_ones(tmp_path):
    dead = tmp_path / "state-999999"
    (dead / "leftover").mkdir(parents=True)
    (tmp_path / "state-999999.lock").touch()  # nobody holds its lock: its process is gone
    live = tmp_path / "state-999998"
    live.mkdir()
    live_lock = os.open(tmp_path / "state-999998.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(live_lock, fcntl.LOCK_EX)  # another open file holding it, as another process would
    try:
        store = RocksState.claimed_under(tmp_path)
        second = RocksState.claimed_under(tmp_path)  # another engine of this process beside it
        try:
            assert store.path.parent == tmp_path and store.path.name.startswith(f"state-{os.getpid()}-")
            assert second.path != store.path and store.path.exists()
            assert not dead.exists() and not (tmp_path / "state-999999.lock").exists()
            assert live.exists()
            store.put(0, b"a/acme", b"1")
            assert store.get(b"a/acme") == b"1" and second.get(b"a/acme") is None
        finally:
            store.close()
            second.close()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["state-999998", "state-999998.lock"]
    finally:
        os.close(live_lock)


def test_a_tenant_on_disk_folds_as_the_in_memory_tenant(rocks_state):
    """The account asks the index for usage inside a segment when a late grant or void splits it."""
    events = [
        CreditGranted(
            event_id="g1", tenant_id="acme", grant_id="g1", amount=100, effective_at=0, expires_at=1_000
        ),
        *[
            UsageRecorded(
                event_id=f"u{n}",
                tenant_id="acme",
                amount=3,
                occurred_at=10 * n,
                model="m",
                prompt_tokens=1,
                completion_tokens=1,
            )
            for n in range(1, 40)
        ],
        CreditGranted(
            event_id="g2", tenant_id="acme", grant_id="g2", amount=50, effective_at=155, priority=-1
        ),
        GrantVoided(event_id="v1", tenant_id="acme", grant_id="g2", voided_at=305),
        UsageRecorded(
            event_id="u7",
            tenant_id="acme",
            amount=3,
            occurred_at=70,
            model="m",
            prompt_tokens=1,
            completion_tokens=1,
        ),  # a resend: a duplicate
    ]
    memory = TenantLedger("acme")
    account = Account("acme")
    view = rocks_state.usage_indexes.open("acme", applied_offset=-1)
    unwritten: list[SeenRecord] = []
    for offset, event in enumerate(events):
        expected = memory.apply(event)
        view.current_offset = offset
        assert account.apply(event, view) == expected
        if isinstance(event, UsageRecorded) and expected:
            unwritten.append(SeenRecord(event.event_id, offset, event.occurred_at, event.amount))
        if len(unwritten) == 7:
            rocks_state.put(0, *seen_batch("acme", unwritten))
            unwritten = []
    for t in (0, 155, 156, 200, 304, 305, 390, 1_000):
        assert account.balance_at(t, view) == memory.balance_at(t), t
