"""Pieces the Kafka benchmarks share: a throwaway local broker, a component run as a child process,
a fast batched producer, and readers of the derived topics by broker timestamp.

Nothing here imports tests/: the benchmark owns its own copies of those ideas.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from scripts import kafka_local

REPO_ROOT = Path(__file__).resolve().parents[1]
CHILD_STOP_TIMEOUT_S = 15
CHILD_LOG_POLL_INTERVAL_S = 0.2
FETCH_TIMEOUT_MS = 200
FETCH_MAX_RECORDS = 10_000


# ---------------------------------------------------------------------------------------------- broker


@dataclass(frozen=True)
class LocalBroker:
    bootstrap: str
    pid: int


@contextlib.contextmanager
def local_broker() -> Iterator[LocalBroker]:
    """A single-node broker in a temporary directory for the block; yields its address and pid.
    The broker is stopped and its directory removed afterwards, whatever happened in the block."""
    directory = Path(tempfile.mkdtemp(prefix="tollgate-bench-kafka-"))
    try:
        address = kafka_local.start(directory)
        try:
            pid = kafka_local.running_pid(directory)
            assert pid is not None, f"the broker started from {directory} has no live pid"
            yield LocalBroker(address.bootstrap, pid)
        finally:
            kafka_local.stop(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- cpu time


CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    user_ticks, system_ticks = int(fields[11]), int(fields[12])  # stat fields 14 and 15
    return (user_ticks + system_ticks) / CLOCK_TICKS_PER_S


# ---------------------------------------------------------------------------------------------- child process


class ChildProcess:
    """One Python child (`python -m <module>`, or `python -c <code>` that runs it) in its own session,
    with its own environment and log file."""

    def __init__(
        self, module: str, env: dict[str, str], log_path: Path, python_args: Sequence[str] | None = None
    ) -> None:
        self.module = module
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        self.log_path = log_path
        self.python_args = list(python_args) if python_args is not None else ["-m", module]
        self.process: subprocess.Popen | None = None

    def start(self) -> ChildProcess:
        assert self.process is None, f"{self.module} already started"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, *self.python_args],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.module} not started"
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM to the child's process group, SIGKILL if it is still there after the timeout."""
        if not self.alive():
            return
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=CHILD_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=CHILD_STOP_TIMEOUT_S)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def wait_for_log(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.log_path.exists() and text in self.log_path.read_text(errors="replace"):
                return
            if not self.alive():
                raise RuntimeError(f"{self.module} exited before logging {text!r}:\n{self.log_tail()}")
            await asyncio.sleep(CHILD_LOG_POLL_INTERVAL_S)
        raise RuntimeError(f"{self.module} did not log {text!r} within {timeout_s}s:\n{self.log_tail()}")


def profiled_module_args(module: str, stats_path: Path) -> list[str]:
    """`python -c` arguments that run `module` as __main__ (as -m does: `python -m cProfile -m` does not
    make the module sys.modules["__main__"]) under cProfile, and write the stats when it exits."""
    code = (
        "import cProfile, runpy\n"
        "profile = cProfile.Profile()\n"
        "profile.enable()\n"
        "try:\n"
        f"    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
        "finally:\n"
        "    profile.disable()\n"
        f"    profile.dump_stats({str(stats_path)!r})\n"
    )
    return ["-c", code]


# ---------------------------------------------------------------------------------------------- producing


def partition_of(key: bytes, partitions: int) -> int:
    """The partition the default partitioner (murmur2, as the Java client) gives a key."""
    return DefaultPartitioner()(key, list(range(partitions)), [])


def keys_covering_partitions(prefix: str, partitions: int, per_partition: int) -> list[str]:
    """Names `prefix-N` chosen so every partition holds exactly `per_partition` of them."""
    chosen: dict[int, list[str]] = {partition: [] for partition in range(partitions)}
    candidate = 0
    while any(len(names) < per_partition for names in chosen.values()):
        name = f"{prefix}-{candidate}"
        names = chosen[partition_of(name.encode(), partitions)]
        if len(names) < per_partition:
            names.append(name)
        candidate += 1
    return [name for partition in range(partitions) for name in chosen[partition]]


@dataclass(frozen=True)
class ProducerOptions:
    acks: str = "all"
    enable_idempotence: bool = True
    linger_ms: int = 20
    max_batch_size_bytes: int = 512 * 1024
    request_timeout_ms: int = 30_000


def new_producer(bootstrap: str, options: ProducerOptions) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks=options.acks,
        enable_idempotence=options.enable_idempotence,
        linger_ms=options.linger_ms,
        max_batch_size=options.max_batch_size_bytes,
        request_timeout_ms=options.request_timeout_ms,
        compression_type=None,
    )


async def send_all(
    producer: AIOKafkaProducer, topic: str, records: Iterable[tuple[bytes, bytes]], in_flight_max: int
) -> dict[int, int]:
    """Send (key, value) records as fast as the client batches them, at most `in_flight_max` unacked;
    return {partition: last offset acknowledged}."""
    assert in_flight_max >= 1, "in_flight_max must be >= 1"
    last_offsets: dict[int, int] = {}
    pending: list[asyncio.Future] = []

    def settle(futures: list[asyncio.Future]) -> None:
        for future in futures:
            metadata = future.result()  # raises if the broker refused it: a benchmark must not go on
            last_offsets[metadata.partition] = max(last_offsets.get(metadata.partition, -1), metadata.offset)

    for key, value in records:
        pending.append(await producer.send(topic, value, key=key))
        if len(pending) >= in_flight_max:
            await asyncio.gather(*pending)
            settle(pending)
            pending = []
    await asyncio.gather(*pending)
    settle(pending)
    return last_offsets


async def send_all_batched(
    producer: AIOKafkaProducer,
    topic: str,
    partitions: int,
    records: Iterable[tuple[bytes, bytes]],
    in_flight_max: int,
) -> dict[int, int]:
    """As `send_all`, for millions of records: whole record batches per partition (`create_batch`,
    `send_batch`) instead of a future per record, partitions by the default partitioner (one hash per
    distinct key). In order per partition; return {partition: last offset acknowledged}."""
    assert in_flight_max >= 1, "in_flight_max must be >= 1"
    partition_of_key: dict[bytes, int] = {}
    open_batches: dict[int, tuple[object, int]] = {}  # partition -> (batch builder, records in it)
    pending: list[tuple[int, int, asyncio.Future]] = []  # (partition, records, future of the first offset)
    in_flight = 0
    last_offsets: dict[int, int] = {}

    async def settle() -> None:
        nonlocal pending, in_flight
        for partition, count, future in pending:
            metadata = await future  # raises if the broker refused it: a benchmark must not go on
            last_offsets[partition] = max(last_offsets.get(partition, -1), metadata.offset + count - 1)
        pending, in_flight = [], 0

    async def ship(partition: int) -> None:
        nonlocal in_flight
        batch, count = open_batches.pop(partition)
        batch.close()
        pending.append((partition, count, await producer.send_batch(batch, topic, partition=partition)))
        in_flight += count
        if in_flight >= in_flight_max:
            await settle()

    for key, value in records:
        partition = partition_of_key.get(key)
        if partition is None:
            partition = partition_of_key[key] = partition_of(key, partitions)
        batch, count = open_batches.get(partition) or (producer.create_batch(), 0)
        if batch.append(key=key, value=value, timestamp=None) is None:  # full: ship it, start another
            open_batches[partition] = (batch, count)
            await ship(partition)
            batch, count = producer.create_batch(), 0
            assert batch.append(key=key, value=value, timestamp=None) is not None, (
                "a record larger than a batch"
            )
        open_batches[partition] = (batch, count + 1)
    for partition in list(open_batches):
        await ship(partition)
    await settle()
    return last_offsets


# ---------------------------------------------------------------------------------------------- reading


def new_assigned_consumer(bootstrap: str, client_id: str) -> AIOKafkaConsumer:
    """A group-less consumer: partitions are assigned by hand and positions set by seek."""
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_uncommitted",
        fetch_max_wait_ms=FETCH_TIMEOUT_MS,
    )


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str, timeout_s: float) -> list[TopicPartition]:
    deadline = time.monotonic() + timeout_s
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return [TopicPartition(topic, partition) for partition in sorted(partitions)]
        if time.monotonic() >= deadline:
            raise RuntimeError(f"topic {topic} not in the consumer's metadata after {timeout_s}s")
        await consumer._client.force_metadata_update()  # noqa: SLF001 - aiokafka has no public refresh
        await asyncio.sleep(0.1)


async def end_offsets(bootstrap: str, topic: str, timeout_s: float) -> dict[int, int]:
    """{partition: next offset} of a topic now."""
    consumer = new_assigned_consumer(bootstrap, "tollgate-bench-offsets")
    await consumer.start()
    try:
        partitions = await topic_partitions(consumer, topic, timeout_s)
        offsets = await consumer.end_offsets(partitions)
        return {tp.partition: offset for tp, offset in offsets.items()}
    finally:
        await consumer.stop()


async def read_range(
    bootstrap: str, topic: str, start_offsets: dict[int, int], stop_offsets: dict[int, int], timeout_s: float
) -> list:
    """Every record of `topic` from start_offsets up to (not including) stop_offsets, per partition."""
    consumer = new_assigned_consumer(bootstrap, "tollgate-bench-reader")
    await consumer.start()
    try:
        wanted = {
            p: (start_offsets.get(p, 0), stop)
            for p, stop in stop_offsets.items()
            if stop > start_offsets.get(p, 0)
        }
        partitions = [TopicPartition(topic, p) for p in wanted]
        if not partitions:
            return []
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, wanted[tp.partition][0])
        records = []
        remaining = set(wanted)
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"{topic}: partitions {sorted(remaining)} not read to their end in {timeout_s}s"
                )
            batches = await consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS, max_records=FETCH_MAX_RECORDS)
            for tp, batch in batches.items():
                stop = wanted[tp.partition][1]
                records.extend(record for record in batch if record.offset < stop)
            for tp in partitions:
                if tp.partition in remaining and await consumer.position(tp) >= wanted[tp.partition][1]:
                    remaining.discard(tp.partition)
        return records
    finally:
        await consumer.stop()
