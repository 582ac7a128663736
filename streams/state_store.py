"""The processor's state on disk (RocksDB through rocksdict): what grows with traffic does not live in RAM.

Two things grow with usage: the changelog's seen-id batches (every usage id ever applied, kept for
permanent dedupe) and the per-tenant usage index the account asks `seen(event_id)` and, rarely,
`usage_between(start, end)`. `PartitionedState` (streams.batch_processor) holds the first in a dict and
the processor's `_OffsetAwareIndex` the second in sets and lists; here both live in one RocksDB:

    RocksState               the `StateReader` of the processor (get, items_with_prefix) and the engine's
                             put(partition, key, value) / drop(partition): the changelog, on disk
    RocksState.usage_indexes open(tenant_id, applied_offset) -> DiskUsageIndex, the processor's usage
                             index of one tenant, derived from the seen-id batches the store holds

Key space (one byte of namespace first; partitions as 4 bytes, times biased by 2**63 as 8 bytes, both
big-endian so that byte order is numeric order):

    k <state key>                                  -> the state value (the changelog record)
    p <partition> <state key>                      -> b"" (which keys a partition owns, for drop)
    i <partition> <tenant> / <event id>            -> the source offset it was first applied at (8 bytes)
    t <partition> <tenant> / <time> <event id>     -> its amount (8 bytes, signed), then its model (UTF-8)

The usage index is a materialisation of the seen batches (`s/<tenant>/<first offset>` state keys):
writing a batch into the store, live or while reading the changelog back on a takeover, writes its
`i` and `t` keys in the same RocksDB write batch. So the index on disk always agrees with the state on
disk, and is restored from the changelog on takeover by the same code that writes it live. What a tenant
applied in this process but whose batch is not written yet sits in the view's overlay (at most one
batch), cleared when the batch lands. A seen batch can be on disk beyond the account snapshot (a crash
between the two writes): opening a tenant at its snapshot's `applied_offset` deletes the index keys of
the records after it (they are redelivered and applied again), as the in-memory processor filters them
out when it reads the state back. Index keys are named by event id, so a record stored in two batches
(a refold with other batch boundaries) is one entry.

In front of the disk, all of fixed size: a membership filter of the usage ids written
(`SEEN_FILTER_BYTES`, two bits per id; see `_SeenFilter`), so that a new usage id, nearly every one,
is known unseen without a disk read; `SEEN_CACHE_ENTRIES_MAX` usage ids most recently found on disk
(an LRU: a producer resend is retried soon after the original); RocksDB's block cache
(`STATE_BLOCK_CACHE_BYTES`, holding index and filter blocks too, so that their memory is bounded) and
its memtables (`STATE_WRITE_BUFFER_BYTES` x `STATE_WRITE_BUFFERS_MAX`). Nothing else grows with traffic.

No write-ahead log and no fsync: the store is a cache of the changelog topic, read back on every
assignment, so a crash loses nothing the changelog does not hold. Where it lives: `RocksState()` in a
temporary directory of its own (tests, the simulation); `RocksState.claimed_under(base)` (the batch
engine, `processor_state_dir`) in `<base>/state-<pid>-<n>`, held by an flock on its `.lock` file beside it
for the life of the process. Claiming first deletes every directory under `base` whose lock is free
(its process is gone: a kill -9 leaves its directory behind), so a restarted process starts empty and
rebuilds its store from the changelog.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import struct
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec
from rocksdict import BlockBasedOptions, Cache, DBCompressionType, Options, Rdict, WriteBatch, WriteOptions

from ledger.usage_index import NO_MODEL, UsageSummary
from streams.processor import SEEN_KEY_PREFIX, SeenRecord, seen_batch_key

STATE_BLOCK_CACHE_BYTES = 32 * 1024 * 1024  # RocksDB block cache, index and filter blocks included
STATE_WRITE_BUFFER_BYTES = 16 * 1024 * 1024  # one memtable
STATE_WRITE_BUFFERS_MAX = 2  # memtables in memory at once (one being flushed)
STATE_OPEN_FILES_MAX = 512  # table files RocksDB keeps open
STATE_BLOOM_FILTER_BITS_PER_KEY = 10  # ~1% false positives: a new usage id rarely reads a block
SEEN_CACHE_ENTRIES_MAX = 100_000  # usage ids (with their first offset) kept in RAM in front of the disk
# The filter of written usage ids: 2**27 bits. At 5M ids about 0.5% of new ids still read the disk, at 20M
# about 6%; it never says "unseen" for an id that was written, so more ids only cost disk reads.
SEEN_FILTER_BYTES = 16 * 1024 * 1024
STATE_DIRECTORY_PREFIX = "tollgate-state-"  # RocksState(): a temporary directory of its own
STATE_DIRECTORY_LOCKED_PREFIX = "state-"  # RocksState.claimed_under(base): base/state-<pid>-<n>
STATE_LOCK_SUFFIX = ".lock"

_STATE = b"k"
_OWNED = b"p"
_SEEN_ID = b"i"
_USAGE_AT = b"t"
_TIME_BIAS = 2**63  # -2**63 + 1 .. 2**63 - 1 (the account's -NEVER .. NEVER) map onto 1 .. 2**64 - 1
_offset_bytes = struct.Struct(">q")
_amount_bytes = struct.Struct(">q")
_partition_bytes = struct.Struct(">I")
_decode_seen_batch = msgspec.msgpack.Decoder(list[SeenRecord]).decode


def _time_key(t: int) -> bytes:
    return (t + _TIME_BIAS).to_bytes(8, "big")


def _seen_batch_tenant(key: bytes) -> str | None:
    """The tenant of a seen-batch state key (`s/<tenant>/<first offset>`), None for any other key."""
    if not key.startswith(SEEN_KEY_PREFIX):
        return None
    return key[len(SEEN_KEY_PREFIX) :].rpartition(b"/")[0].decode()


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with `prefix` (prefix never ends in 0xff here)."""
    assert prefix and prefix[-1] != 0xFF, f"prefix {prefix!r} has no simple upper bound"
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _open_rocksdb(path: Path) -> Rdict:
    table = BlockBasedOptions()
    table.set_bloom_filter(STATE_BLOOM_FILTER_BITS_PER_KEY, False)
    table.set_block_cache(Cache(STATE_BLOCK_CACHE_BYTES))
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_block_based_table_factory(table)
    options.set_write_buffer_size(STATE_WRITE_BUFFER_BYTES)
    options.set_max_write_buffer_number(STATE_WRITE_BUFFERS_MAX)
    options.set_max_open_files(STATE_OPEN_FILES_MAX)
    options.set_compression_type(DBCompressionType.none())  # CPU is scarcer than disk; the store is a cache
    db = Rdict(str(path), options)
    write_options = WriteOptions()
    write_options.disable_wal = True  # the changelog is the log (see the module docstring)
    db.set_write_options(write_options)
    return db


class _SeenFilter:
    """A two-bit membership filter of usage event ids, of fixed size (a Bloom filter with k = 2 over
    Python's string hash, which is per process, as the filter is). `may_contain` is False only for an id
    never added: ids are never taken out (a dropped or rolled-back id only costs a disk read later)."""

    __slots__ = ("bits", "mask")

    def __init__(self, size_bytes: int) -> None:
        assert size_bytes >= 1 and size_bytes & (size_bytes - 1) == 0, (
            f"a power of two bytes, got {size_bytes}"
        )
        assert size_bytes <= 2**29, "bit positions come from 32 bits of the hash"
        self.bits = bytearray(size_bytes)
        self.mask = size_bytes * 8 - 1

    def add_all(self, event_ids: Iterable[str]) -> None:
        bits, mask = self.bits, self.mask
        for event_id in event_ids:  # one call per seen batch, not per id: this runs once per usage event
            h = hash(event_id)
            low, high = h & mask, (h >> 32) & mask
            bits[low >> 3] |= 1 << (low & 7)
            bits[high >> 3] |= 1 << (high & 7)

    def may_contain(self, event_id: str) -> bool:
        h = hash(event_id)
        bits, mask = self.bits, self.mask
        low, high = h & mask, (h >> 32) & mask
        return bool(bits[low >> 3] >> (low & 7) & 1 and bits[high >> 3] >> (high & 7) & 1)


class _SeenCache:
    """An LRU of usage-id keys (the `i` key) -> the offset the id was first applied at."""

    __slots__ = ("_entries", "entries_max")

    def __init__(self, entries_max: int) -> None:
        assert entries_max >= 1, f"entries_max must be >= 1, got {entries_max}"
        self._entries: OrderedDict[bytes, int] = OrderedDict()
        self.entries_max = entries_max

    def get(self, key: bytes) -> int | None:
        offset = self._entries.get(key)
        if offset is not None:
            self._entries.move_to_end(key)
        return offset

    def put(self, key: bytes, offset: int) -> None:
        entries = self._entries
        if key in entries:
            entries.move_to_end(key)
        entries[key] = offset
        if len(entries) > self.entries_max:
            entries.popitem(last=False)

    def discard(self, key: bytes) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class StateDirectory:
    """`<base>/state-<pid>-<n>` (the n-th of this process), locked (flock on `<base>/state-<pid>-<n>.lock`)
    while it is in use."""

    def __init__(self, base: Path) -> None:
        base.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(base)
        name = f"{STATE_DIRECTORY_LOCKED_PREFIX}{os.getpid()}-{next(_claims)}"
        self.path = base / name
        self._lock_path = base / f"{name}{STATE_LOCK_SUFFIX}"
        self._lock_fd: int | None = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours: the pid is this live process's
        shutil.rmtree(self.path, ignore_errors=True)  # a dead process's under a reused pid
        self.path.mkdir()

    def release(self) -> None:
        if self._lock_fd is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock_path.unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None


_claims = itertools.count()


def _remove_abandoned(base: Path) -> None:
    """Delete the state directories under `base` whose owner is gone (their lock is free)."""
    for lock_path in base.glob(f"{STATE_DIRECTORY_LOCKED_PREFIX}*{STATE_LOCK_SUFFIX}"):
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:  # its owner released it meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live process's
            os.close(fd)
            continue
        shutil.rmtree(base / lock_path.name.removesuffix(STATE_LOCK_SUFFIX), ignore_errors=True)
        lock_path.unlink(missing_ok=True)
        os.close(fd)


class RocksState:
    """`StateReader` over RocksDB, droppable per partition: the on-disk `PartitionedState`. `path` None:
    a temporary directory (under `temporary_parent` when given), deleted by `close`."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        temporary_parent: Path | None = None,
        seen_cache_entries_max: int = SEEN_CACHE_ENTRIES_MAX,
        seen_filter_bytes: int = SEEN_FILTER_BYTES,
    ) -> None:
        assert path is None or temporary_parent is None, "a path, or a temporary directory's parent"
        self._owns_directory = path is None
        self._claimed: StateDirectory | None = None
        self._closed = False
        if path is None:
            path = Path(tempfile.mkdtemp(prefix=STATE_DIRECTORY_PREFIX, dir=temporary_parent))
        self.path = path
        self._db = _open_rocksdb(self.path)
        self.usage_indexes = DiskUsageIndexes(
            self._db, _SeenCache(seen_cache_entries_max), _SeenFilter(seen_filter_bytes)
        )

    @classmethod
    def claimed_under(cls, base: Path, *, seen_cache_entries_max: int = SEEN_CACHE_ENTRIES_MAX) -> RocksState:
        """A fresh store in this process's own directory under `base` (see the module docstring)."""
        directory = StateDirectory(base)
        try:
            state = cls(directory.path, seen_cache_entries_max=seen_cache_entries_max)
        except BaseException:
            directory.release()
            raise
        state._claimed = directory
        return state

    # ------------------------------------------------------------------------------- StateReader

    def get(self, key: bytes) -> bytes | None:
        return self._db.get(_STATE + key)

    def items_with_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        return (
            (key[1:], value)
            for key, value in self._items_between(_STATE + prefix, _prefix_end(_STATE + prefix))
        )

    # ------------------------------------------------------------------------------- the engine's writes

    def put(self, partition: int, key: bytes, value: bytes | None) -> None:
        """One changelog record of `partition` (None: a tombstone); a seen batch also writes its index."""
        self.put_all(partition, ((key, value),))

    def put_all(self, partition: int, records: Iterable[tuple[bytes, bytes | None]]) -> None:
        """Several changelog records of one partition in one RocksDB write. A key may come more than once
        (a changelog read back: a seen batch rewritten after a crash); each replaces the one before."""
        batch = WriteBatch(raw_mode=True)
        owned = _OWNED + _partition_bytes.pack(partition)
        seen_in_batch: dict[bytes, bytes | None] = {}  # seen batches written into `batch`, not yet on disk
        for key, value in records:
            tenant_id = _seen_batch_tenant(key)
            if tenant_id is not None:
                old = seen_in_batch[key] if key in seen_in_batch else self.get(key)
                self.usage_indexes.replace_batch(batch, partition, tenant_id, old, value)
                seen_in_batch[key] = value
            if value is None:
                batch.delete(_STATE + key)
                batch.delete(owned + key)
            else:
                batch.put(_STATE + key, value)
                batch.put(owned + key, b"")
        self._db.write(batch)

    def drop(self, partition: int) -> None:
        """Forget a partition's state and the usage index derived from it (the partition went elsewhere)."""
        owned = _OWNED + _partition_bytes.pack(partition)
        batch = WriteBatch(raw_mode=True)
        for key, _ in self._items_between(owned, _prefix_end(owned)):
            batch.delete(_STATE + key[len(owned) :])
        self._db.write(batch)
        self._db.delete_range(owned, _prefix_end(owned))
        self.usage_indexes.drop(partition)

    def close(self) -> None:
        """Close the store and delete its directory (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._db.close()
        if self._owns_directory:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._claimed is not None:
            self._claimed.release()

    def __len__(self) -> int:
        """Keys held (a scan: for tests and diagnostics, not the hot path)."""
        return sum(1 for _ in self.items_with_prefix(b""))

    def _items_between(self, start: bytes, end: bytes) -> Iterator[tuple[bytes, bytes]]:
        """(stored key, value) for start <= stored key < end, in key order."""
        for key, value in self._db.items(from_key=start):
            if key >= end:
                return
            yield key, value


class DiskUsageIndexes:
    """The usage index of every tenant of a `RocksState`, one `DiskUsageIndex` view per open tenant."""

    def __init__(self, db: Rdict, cache: _SeenCache, seen_filter: _SeenFilter) -> None:
        self.db = db
        self.cache = cache
        self.filter = seen_filter
        self._partition_of: dict[str, int] = {}  # tenants with a seen batch on disk: O(tenants)
        self._open: dict[str, DiskUsageIndex] = {}

    def open(self, tenant_id: str, applied_offset: int) -> DiskUsageIndex:
        """The index of a tenant whose account snapshot includes source offsets up to `applied_offset`:
        batches written after it are taken out (they will be redelivered and applied again)."""
        self._roll_back_after(tenant_id, applied_offset)
        view = self._open[tenant_id] = DiskUsageIndex(self, tenant_id)
        return view

    def forget(self) -> None:
        """Close every view (the processor dropped its cached tenants); reopen with `open`."""
        self._open.clear()

    def prefix(self, tenant_id: str) -> bytes | None:
        """<partition> <tenant> / for the tenant's index keys, None while it has nothing on disk."""
        partition = self._partition_of.get(tenant_id)
        if partition is None:
            return None
        return _partition_bytes.pack(partition) + tenant_id.encode() + b"/"

    def replace_batch(
        self, batch: WriteBatch, partition: int, tenant_id: str, old: bytes | None, new: bytes | None
    ) -> None:
        """Into `batch`: the index keys of a seen batch's new value, without those of its old value."""
        known = self._partition_of.setdefault(tenant_id, partition)
        assert known == partition, f"tenant {tenant_id} written on partition {partition}, known on {known}"
        prefix = _partition_bytes.pack(partition) + tenant_id.encode() + b"/"
        if old is not None:
            self._delete_records(batch, prefix, _decode_seen_batch(old))
        if new is None:
            return
        records = _decode_seen_batch(new)
        put = batch.put
        pack_offset, pack_amount = _offset_bytes.pack, _amount_bytes.pack
        seen_prefix, usage_prefix = _SEEN_ID + prefix, _USAGE_AT + prefix
        for record in records:
            event_id = record.event_id
            encoded_id = event_id.encode()
            put(seen_prefix + encoded_id, pack_offset(record.offset))
            put(
                usage_prefix + (record.occurred_at + _TIME_BIAS).to_bytes(8, "big") + encoded_id,
                pack_amount(record.amount) + record.model.encode(),
            )
        self.filter.add_all([record.event_id for record in records])
        view = self._open.get(tenant_id)
        if view is not None:
            view.written(records)

    def drop(self, partition: int) -> None:
        part = _partition_bytes.pack(partition)
        for namespace in (_SEEN_ID, _USAGE_AT):
            self.db.delete_range(namespace + part, _prefix_end(namespace + part))
        for tenant_id in [t for t, p in self._partition_of.items() if p == partition]:
            del self._partition_of[tenant_id]
            self._open.pop(tenant_id, None)
        self.cache.clear()

    def _delete_records(
        self, batch: WriteBatch, prefix: bytes, records: list[SeenRecord], after_offset: int = -2
    ) -> None:
        for record in records:
            if record.offset <= after_offset:
                continue
            seen_key = _SEEN_ID + prefix + record.event_id.encode()
            batch.delete(seen_key)
            batch.delete(_USAGE_AT + prefix + _time_key(record.occurred_at) + record.event_id.encode())
            self.cache.discard(seen_key)

    def _roll_back_after(self, tenant_id: str, applied_offset: int) -> None:
        prefix = self.prefix(tenant_id)
        if prefix is None:
            return
        first_after = _STATE + seen_batch_key(tenant_id, applied_offset + 1)
        tenant_batches = _STATE + SEEN_KEY_PREFIX + tenant_id.encode() + b"/"
        tenant_batches_end = _prefix_end(tenant_batches)
        batch = WriteBatch(raw_mode=True)
        for key, value in self.db.items(backwards=True, from_key=first_after):
            if (
                key < first_after
            ):  # the last batch that starts at or before the snapshot: its records after it
                if key >= tenant_batches:
                    self._delete_records(
                        batch, prefix, _decode_seen_batch(value), after_offset=applied_offset
                    )
                break
        for key, value in self.db.items(from_key=first_after):
            if key >= tenant_batches_end:
                break
            self._delete_records(batch, prefix, _decode_seen_batch(value))
        if len(batch):
            self.db.write(batch)


class DiskUsageIndex:
    """One tenant's usage index as the processor sees it (the on-disk `_OffsetAwareIndex`): an event id is
    a duplicate when it was first applied at another source offset; at the same offset it is this record,
    redelivered. Set `current_offset` before each `Account.apply`."""

    __slots__ = ("_indexes", "tenant_id", "current_offset", "_pending")

    def __init__(self, indexes: DiskUsageIndexes, tenant_id: str) -> None:
        self._indexes = indexes
        self.tenant_id = tenant_id
        self.current_offset = -1
        # event id -> (offset, occurred_at, amount, model), not written yet
        self._pending: dict[str, tuple[int, int, int, str]] = {}

    @property
    def index(self) -> DiskUsageIndex:
        """The plain `UsageIndex` for queries (as `_OffsetAwareIndex.index`): this view itself."""
        return self

    def seen(self, event_id: str) -> bool:
        first = self._first_offset(event_id)
        return first is not None and first != self.current_offset

    def record(self, event_id: str, occurred_at: int, amount: int, model: str) -> None:
        self._pending[event_id] = (self.current_offset, occurred_at, amount, model)

    def _stored_between(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        """(time, stored value) of the usage on disk with start <= time < end, in time order."""
        prefix = self._indexes.prefix(self.tenant_id)
        if prefix is None or start >= end:
            return
        head = _USAGE_AT + prefix
        high = head + _time_key(end)
        for key, value in self._indexes.db.items(from_key=head + _time_key(start)):
            if key >= high:
                break
            yield int.from_bytes(key[len(head) : len(head) + 8], "big") - _TIME_BIAS, value

    def usage_between(self, start: int, end: int) -> UsageSummary:
        total, first_at, last_at = 0, None, None
        for at, value in self._stored_between(start, end):
            total += _amount_bytes.unpack_from(value)[0]
            first_at = at if first_at is None else first_at
            last_at = at
        for _offset, at, amount, _model in self._pending.values():
            if start <= at < end:
                total += amount
                first_at = at if first_at is None or at < first_at else first_at
                last_at = at if last_at is None or at > last_at else last_at
        return UsageSummary(total, first_at, last_at)

    def usage_by_model_between(self, start: int, end: int) -> dict[str, int]:
        usage: dict[str, int] = {}
        for _at, value in self._stored_between(start, end):
            model = value[_amount_bytes.size :].decode()
            usage[model] = usage.get(model, 0) + _amount_bytes.unpack_from(value)[0]
        for _offset, at, amount, model in self._pending.values():
            if start <= at < end:
                usage[model] = usage.get(model, 0) + amount
        return {model: amount for model, amount in usage.items() if amount and model != NO_MODEL}

    def written(self, records: list[SeenRecord]) -> None:
        """A seen batch of this tenant reached the store: its records are on disk now."""
        pending = self._pending
        for record in records:
            pending.pop(record.event_id, None)

    def pending_count(self) -> int:
        return len(self._pending)

    def _first_offset(self, event_id: str) -> int | None:
        pending = self._pending.get(event_id)
        if pending is not None:
            return pending[0]
        indexes = self._indexes
        if not indexes.filter.may_contain(event_id):  # nearly every new id: no disk read
            return None
        prefix = indexes.prefix(self.tenant_id)
        if prefix is None:
            return None
        key = _SEEN_ID + prefix + event_id.encode()
        cache = indexes.cache
        offset = cache.get(key)
        if offset is not None:
            return offset
        stored = self._indexes.db.get(key)
        if stored is None:
            return None
        offset = _offset_bytes.unpack(stored)[0]
        cache.put(key, offset)
        return offset
