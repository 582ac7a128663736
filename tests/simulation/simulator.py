"""A seeded, deterministic simulation of the stream processor (in the spirit of TigerBeetle's VOPR).

The real `streams.batch_processor.BatchEngine` (which runs the real `LedgerProcessor`) over a simulated
log (tests/simulation/log.py): two processor processes in one consumer group, driven by a seeded random
schedule of
  - producers appending events in any order, with resends (the same event again at a later offset);
  - batches of random composition (every fetch picks its own size per partition, so a redelivery after
    a crash regroups the records differently);
  - crashes before any single record a processor writes (between state writes, between state and
    outputs, in the middle of the outputs), crashes between steps, and before an offset commit;
  - acknowledgements lost (the records are stored, the broker's ack never comes: the engine resets and
    resumes from the committed offsets, as the aiokafka loop does);
  - rebalances (a partition handed over after a commit) and takeovers (a dead processor's partitions
    moved to the other one), restarts;
  - expiry sweeps at random times (wall clocks are not monotonic either);
  - compaction of the state changelog.
After every step finance reads the new output records and checks the property (model.py): one entry id,
one content; every balance equals the brute-force fold at its as_of; and for every partition whose
owner is caught up (it read the partition's state back and published its outboxes), the tenants' entries
integrate exactly to the fold. At the end everything is drained and swept past every end, and checked.

`simulate(seed)` replays exactly: every decision comes from `random.Random(seed)`, the processor's
clock is the simulated one, and nothing awaits real I/O (coroutines are stepped by hand).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.codec import encode_event
from ledger.events import CreditGranted, GrantVoided, UsageRecorded
from streams.audit_checkpoints import CheckpointPolicy, key_id
from streams.audit_verify import EntryRow, refold
from streams.batch_processor import BatchEngine
from streams.producer import BrokerUnavailable
from streams.records import partition_for_key
from streams.state_store import RocksState
from streams.topics import LedgerTopics
from tests.simulation.alerts_check import AlertObserver, with_rules
from tests.simulation.chain_check import ChainObserver
from tests.simulation.log import FaultPlan, SimulatedCrash, SimulatedLog, SimulatedTransport
from tests.simulation.model import Finance, LedgerModel, PropertyViolated

GROUP = "sim-processor"
CHANGELOG = "sim.state-changelog"
PROCESSOR_COUNT = 2
TIME_HORIZON_MS = 300  # event times, record times and sweeps fall in [0, a little beyond this)
STEPS_MAX = 400
TRACE_SHOWN_MAX = 40
SHARED_MEMORY_DIR = "/dev/shm"


def run_sync(coroutine):
    """Run a coroutine that never suspends on real I/O (the simulated transport never does)."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise RuntimeError("a simulated step awaited real I/O")


@dataclass
class SimulatedProcessor:
    """One processor process: its engine (None while dead), consumer positions and offsets to commit."""

    name: str
    engine: BatchEngine | None = None
    positions: dict[int, int] = field(default_factory=dict)
    committable: dict[int, int] = field(default_factory=dict)
    # As BatchProcessor pipelines: a folded batch's outputs whose emit has not run yet, and the offsets it
    # makes committable. It runs when the next batch is folded, or before a sweep, a commit or a handover.
    in_flight: tuple[list, dict[int, int]] | None = None


EngineFactory = Callable[[SimulatedTransport, LedgerTopics, str, int], BatchEngine]


def scratch_parent() -> Path | None:
    """Where the engines' on-disk stores go: tmpfs when there is one (a RocksDB opens in ~5 ms there, ~40 ms
    on a disk that syncs; the simulation opens one per processor start), else the temporary directory."""
    shm = Path(SHARED_MEMORY_DIR)
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


def real_engine(transport, topics, changelog_topic, partitions) -> BatchEngine:
    return BatchEngine(
        transport,
        topics=topics,
        changelog_topic=changelog_topic,
        partitions=partitions,
        state=RocksState(temporary_parent=scratch_parent()),
    )


class Simulation:
    def __init__(self, seed: int, engine_factory: EngineFactory = real_engine) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        rng = self.rng
        self.engine_factory = engine_factory
        self.topics = LedgerTopics(
            events="sim.events",
            entries="sim.entries",
            balances="sim.balances",
            dlq="sim.dlq",
            checkpoints="sim.checkpoints",
        )
        # small, seeded checkpoint intervals so that checkpoints fall inside batches, at their ends and
        # across crashes; a key derived from the seed
        key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"sim-%d" % seed).digest())
        self.checkpoint_policy = CheckpointPolicy(
            rng.choice([1, 2, 3, 7, 1_000]), rng.choice([1, 20, 100, 10**9]), key, key_id(key.public_key())
        )
        self.partitions = rng.randint(1, 3)
        # BatchProcessor's pipeline (fold the next batch, then emit the previous one), or one batch at a time
        self.pipelined = rng.random() < 0.75
        self.log = SimulatedLog(self.partitions)
        self.faults = FaultPlan(
            rng,
            crash_probability=rng.choice([0.0, 0.01, 0.03, 0.08]),
            ack_lost_probability=rng.choice([0.0, 0.02, 0.05]),
        )
        self.model = LedgerModel(self.log, self.topics)
        self.finance = Finance(
            self.log, self.topics, self.model, self.partition_of, ChainObserver(key.public_key())
        )
        self.alerts = AlertObserver(self.log, self.topics.alerts)  # ledger.alerts: one content per id
        self.pending = generate_events(rng)
        self.tenants = sorted({event.tenant_id for event in self.pending})
        self.processors = [SimulatedProcessor(f"p{n}") for n in range(PROCESSOR_COUNT)]
        self.owner = {partition: rng.randrange(PROCESSOR_COUNT) for partition in range(self.partitions)}
        self.trace: list[str] = []
        for processor in self.processors:
            self.start(processor)

    def partition_of(self, tenant_id: str) -> int:
        return partition_for_key(tenant_id.encode(), self.partitions)

    # ------------------------------------------------------------------------------------------ run

    def check_refold(self, tenant_id: str) -> None:
        """`tollgate audit verify`'s re-fold: the tenant's records of the source log, cut into the batches
        and sweeps its entries' links name, give back every published entry byte for byte."""
        divergence = _refold_divergence(self, tenant_id)
        if divergence is not None:
            raise PropertyViolated(f"re-fold diverges: {divergence}")

    def run(self) -> None:
        try:
            steps = self.rng.randint(20, STEPS_MAX)
            for _ in range(steps):
                self.step()
                self.observe()
            self.drain()
        except PropertyViolated as error:
            shown = "\n  ".join(self.trace[-TRACE_SHOWN_MAX:])
            raise PropertyViolated(
                f"simulation seed {self.seed} failed: {error}\n"
                f"replay it exactly: make simulate SEED={self.seed}\n"
                f"last steps:\n  {shown}"
            ) from None

    def step(self) -> None:
        rng = self.rng
        action = rng.choices(
            ["produce", "fold", "commit", "sweep", "crash", "restart", "rebalance", "compact"],
            weights=[25, 35, 10, 8, 3, 8, 5, 2],
        )[0]
        processor = rng.choice(self.processors)
        getattr(self, action)(processor)

    def observe(self) -> None:
        self.finance.consume()
        self.alerts.consume()
        for partition in range(self.partitions):
            processor = self.processors[self.owner[partition]]
            if processor.engine is not None and partition in processor.engine.loaded:
                for tenant_id in sorted(self.finance.unchecked):
                    if self.partition_of(tenant_id) == partition:
                        self.finance.check_integration(tenant_id)

    def drain(self) -> None:
        """Everything produced, every processor alive, every record folded and committed, swept past every
        end: then every tenant's entries must integrate to the fold of all its events."""
        self.faults.crash_probability = self.faults.ack_lost_probability = 0.0
        while self.pending:
            self.produce(self.processors[0])
        for processor in self.processors:
            if processor.engine is None:
                self.restart(processor)
        for _ in range(10_000):
            behind = [
                p
                for p in range(self.partitions)
                if self.processors[self.owner[p]].positions[p] < self.log.end_offset(self.topics.events, p)
            ]
            if not behind:
                break
            for processor in self.processors:
                self.fold(processor, batch_max=50)
        else:
            raise PropertyViolated("the processors did not catch up")
        final_sweep_ms = TIME_HORIZON_MS * 10
        for processor in self.processors:
            self.commit(processor, settle=True)
            self.sweep(processor, now_ms=final_sweep_ms)
        self.observe()
        for tenant_id in self.tenants:
            self.finance.check_integration(tenant_id)
            self.finance.chain.check_complete(tenant_id)
            self.check_refold(tenant_id)
            owner = self.processors[self.owner[self.partition_of(tenant_id)]].engine
            self.alerts.check_complete(tenant_id, owner.processor.tenant_rules(tenant_id))
            self.finance.check_balance_now(tenant_id, final_sweep_ms)
            latest = self.finance.latest_balance.get(tenant_id)
            end = self.log.end_offset(self.topics.events, self.partition_of(tenant_id))
            if latest is not None:
                applied = self.model.applied_events(tenant_id, self.partition_of(tenant_id), end - 1)
                covered = self.model.applied_events(
                    tenant_id, self.partition_of(tenant_id), latest.applied_offset
                )
                if applied != covered:
                    raise PropertyViolated(
                        f"{tenant_id}: the latest balance does not cover every event folded"
                    )

    # -------------------------------------------------------------------------------------- actions

    def produce(self, _processor) -> None:
        count = self.rng.randint(1, 4)
        for event in self.pending[:count]:
            self.log.clock_ms += self.rng.randint(0, 8)
            self.log.append(
                self.topics.events,
                self.partition_of(event.tenant_id),
                event.tenant_id.encode(),
                encode_event(event),
            )
        del self.pending[:count]
        self.trace.append(f"produce {count} (clock {self.log.clock_ms})")

    def fold(self, processor: SimulatedProcessor, batch_max: int | None = None) -> None:
        engine = processor.engine
        if engine is None:
            return
        owned = self.owned(processor)
        batches = {}
        for partition in owned:
            if batch_max is None and self.rng.random() < 0.3:
                continue  # this fetch brought nothing from that partition
            size = batch_max or self.rng.randint(1, 8)
            records = self.log.read(self.topics.events, partition, processor.positions[partition], size)
            if records:
                batches[partition] = records
        self.trace.append(
            f"{processor.name} fold { ({p: (r[0].offset, r[-1].offset) for p, r in batches.items()}) }"
        )
        if self.guarded(processor, lambda: self._fold(processor, owned, batches)):
            for partition, records in batches.items():
                processor.positions[partition] = records[-1].offset + 1

    async def _fold(self, processor: SimulatedProcessor, owned, batches) -> None:
        engine = processor.engine
        if not engine.loaded.issuperset(owned):  # as BatchProcessor._fold: every assigned partition first
            await self._settle(processor)
            await engine.ensure_loaded(owned)
        if not batches:
            return
        offsets = {partition: records[-1].offset + 1 for partition, records in batches.items()}
        if not self.pipelined:
            await engine.fold(batches)
            processor.committable.update(offsets)
            return
        outputs = engine.prepare(batches)  # folded in memory while the previous batch's emit is in flight
        await self._settle(processor)
        processor.in_flight = (outputs, offsets)

    async def _settle(self, processor: SimulatedProcessor) -> None:
        if processor.in_flight is None:
            return
        (outputs, offsets), processor.in_flight = processor.in_flight, None
        self.trace.append(f"  {processor.name} emits the batch in flight {offsets}")
        await processor.engine.emit(outputs)
        processor.committable.update(offsets)

    def sweep(self, processor: SimulatedProcessor, now_ms: int | None = None) -> None:
        engine = processor.engine
        if engine is None:
            return
        now_ms = self.rng.randint(0, TIME_HORIZON_MS + 100) if now_ms is None else now_ms
        self.trace.append(f"{processor.name} sweep at {now_ms}")
        owned = self.owned(processor)
        self.guarded(processor, lambda: self._sweep(processor, owned, now_ms))

    async def _sweep(self, processor: SimulatedProcessor, owned, now_ms: int) -> None:
        await self._settle(processor)  # as BatchProcessor: a sweep writes state after the batch in flight
        await processor.engine.ensure_loaded(owned)
        await processor.engine.sweep(now_ms)

    def commit(self, processor: SimulatedProcessor, settle: bool | None = None) -> None:
        if processor.engine is None:
            return
        settle = self.rng.random() < 0.5 if settle is None else settle  # the batch in flight got its acks
        if settle and not self.guarded(processor, lambda: self._settle(processor)):
            return
        if self.faults.crash_probability and self.rng.random() < self.faults.crash_probability:
            self.trace.append(f"{processor.name} crashes before committing {processor.committable}")
            self.kill(processor)
            return
        for partition, next_offset in processor.committable.items():
            self.log.commit(GROUP, partition, next_offset)
        self.trace.append(f"{processor.name} commit {processor.committable}")
        processor.committable = {}

    def crash(self, processor: SimulatedProcessor) -> None:
        if processor.engine is not None:
            self.trace.append(f"{processor.name} killed between steps")
            self.kill(processor)

    def restart(self, processor: SimulatedProcessor) -> None:
        if processor.engine is None:
            self.trace.append(f"{processor.name} restarts")
            self.start(processor)

    def rebalance(self, _processor) -> None:
        partition = self.rng.randrange(self.partitions)
        old = self.processors[self.owner[partition]]
        new_index = (self.owner[partition] + 1) % PROCESSOR_COUNT
        new = self.processors[new_index]
        if new.engine is None:
            return
        if old.engine is not None:  # a rebalance: the batch in flight is done first
            self.guarded(old, lambda: self._settle(old))
        if old.engine is not None:  # then its offsets are committed, and the partition released
            if partition in old.committable:
                self.log.commit(GROUP, partition, old.committable.pop(partition))
            old.engine.release([partition])
            self.trace.append(f"{partition} handed over {old.name} -> {new.name}")
        else:
            self.trace.append(f"{partition} taken over from dead {old.name} by {new.name}")
        old.positions.pop(partition, None)
        self.owner[partition] = new_index
        new.positions[partition] = self.log.committed_offset(GROUP, partition)

    def compact(self, _processor) -> None:
        partition = self.rng.randrange(self.partitions)
        self.log.compact(CHANGELOG, partition)
        self.trace.append(f"changelog {partition} compacted")

    # ------------------------------------------------------------------------------------- helpers

    def owned(self, processor: SimulatedProcessor) -> list[int]:
        index = self.processors.index(processor)
        return [p for p in range(self.partitions) if self.owner[p] == index]

    def start(self, processor: SimulatedProcessor) -> None:
        transport = SimulatedTransport(self.log, CHANGELOG, self.faults)
        processor.engine = self.engine_factory(transport, self.topics, CHANGELOG, self.partitions)
        processor.engine.processor.checkpoints = self.checkpoint_policy
        processor.positions = {p: self.log.committed_offset(GROUP, p) for p in self.owned(processor)}
        processor.committable = {}

    def kill(self, processor: SimulatedProcessor) -> None:
        if processor.engine is not None:
            processor.engine.close()  # its on-disk state dies with it (a restart starts from the changelog)
        processor.engine = None
        processor.positions = {}
        processor.committable = {}
        processor.in_flight = None

    def guarded(self, processor: SimulatedProcessor, make_step) -> bool:
        """Run one engine step; a crash kills the process, a lost ack rewinds it to its committed offsets."""
        try:
            run_sync(make_step())
            return True
        except SimulatedCrash:
            self.trace.append(f"  {processor.name} crashed mid-step")
            self.kill(processor)
        except BrokerUnavailable:
            self.trace.append(f"  {processor.name}: ack lost; reset to the committed offsets")
            processor.engine.reset()
            processor.committable = {}
            processor.in_flight = None
            processor.positions = {p: self.log.committed_offset(GROUP, p) for p in self.owned(processor)}
        return False


def generate_events(rng: random.Random) -> list:
    """A few tenants' grants, voids and usage in any order, with resends (the same event again later)."""
    events: list = []
    firsts = []
    for t in range(rng.randint(1, 4)):
        tenant = f"tenant-{t}"
        grants = []
        for g in range(rng.randint(1, 3)):
            effective_at = rng.randint(0, 200)
            expires_at = rng.choice([None, effective_at + rng.randint(1, 150)])
            grants.append(
                CreditGranted(
                    event_id=f"{tenant}-grant-{g}",
                    tenant_id=tenant,
                    grant_id=f"{tenant}-g{g}",
                    amount=rng.randint(1, 20),
                    effective_at=effective_at,
                    expires_at=expires_at,
                    priority=rng.randint(0, 1),
                )
            )
        voids = [
            GrantVoided(
                event_id=f"{tenant}-void-{n}",
                tenant_id=tenant,
                grant_id=rng.choice(grants).grant_id,
                voided_at=rng.randint(0, TIME_HORIZON_MS),
            )
            for n in range(rng.choice([0, 0, 1, 2]))
        ]
        usage = [
            UsageRecorded(
                event_id=f"{tenant}-req-{n}",
                tenant_id=tenant,
                amount=rng.randint(0, 8),
                occurred_at=rng.randint(0, TIME_HORIZON_MS),
                model="m",
                prompt_tokens=1,
                completion_tokens=1,
            )
            for n in range(rng.randint(1, 12))
        ]
        events += grants[1:] + voids + usage
        firsts.append(grants[0])
    rng.shuffle(events)
    if rng.random() < 0.8:  # as admission orders them: a tenant's first grant before its usage
        events = firsts + events
    else:  # any order at all: usage before any grant is dead-lettered
        for grant in firsts:
            events.insert(rng.randint(0, len(events)), grant)
    events = with_scopes(rng, events)
    events = with_rules(rng, events, TIME_HORIZON_MS)
    for _ in range(rng.randint(0, len(events) // 3)):  # producer resends
        position = rng.randrange(len(events))
        events.insert(rng.randint(position, len(events)), events[position])
    return events


SCOPES = (("m",), ("m2",), ("m", "m2"))  # nested or disjoint: the oracle draws usage one event at a time
USAGE_MODELS = ("m", "m2", "m3")  # m3: no scope names it


def with_scopes(rng: random.Random, events: list) -> list:
    """Half the tenants get grants scoped to models (ledger.scoped) and usage of several models, in
    whatever order their events arrive: a tenant's first scoped grant may come after usage it is backdated
    over."""
    scoped_tenants = {t for t in sorted({e.tenant_id for e in events}) if rng.random() < 0.5}
    result = []
    for event in events:
        if event.tenant_id in scoped_tenants:
            if isinstance(event, CreditGranted):
                event = msgspec.structs.replace(event, models=rng.choice(((), *SCOPES)))
            elif isinstance(event, UsageRecorded):
                event = msgspec.structs.replace(event, model=rng.choice(USAGE_MODELS))
        result.append(event)
    return result


def _refold_divergence(simulation: Simulation, tenant_id: str):
    partition = simulation.partition_of(tenant_id)
    events = [
        r
        for r in simulation.log.partition_log(simulation.topics.events, partition)
        if r.key == tenant_id.encode()
    ]
    chain = simulation.finance.chain
    published = [
        EntryRow(chain.records[(tenant_id, sequence)])
        for sequence in sorted(s for t, s in chain.records if t == tenant_id)
    ]
    return refold(tenant_id, events, published, simulation.topics.events)


def simulate(seed: int, engine_factory: EngineFactory = real_engine) -> Simulation:
    simulation = Simulation(seed, engine_factory)
    try:
        simulation.run()
    finally:
        for processor in simulation.processors:
            if processor.engine is not None:
                processor.engine.close()
    return simulation
