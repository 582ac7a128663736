"""The processor simulation (tests/simulation/simulator.py) over many seeds, and proof that it can fail:
the same engine with the write order of before the fix (outputs published before the state, nothing
republished on recovery) is caught, the failing seed names itself, and replaying it fails the same way."""

from __future__ import annotations

import logging

import pytest

from streams.batch_processor import BatchEngine
from streams.state_store import RocksState
from tests.simulation.model import PropertyViolated
from tests.simulation.simulator import scratch_parent, simulate

SEEDS = 2_000  # `make test` runs these; `make simulate SEEDS=N` runs any number
CHUNKS = 8


@pytest.fixture(autouse=True)
def quiet_dead_letters():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_the_property_holds_for_every_seed(chunk):
    size = SEEDS // CHUNKS
    for seed in range(chunk * size, (chunk + 1) * size):
        simulate(seed)


class PublishFirstEngine(BatchEngine):
    """The write order before the fix: outputs out, then the state; nothing sent again on recovery."""

    async def emit(self, outputs):
        await self._publish(outputs)
        await self._write_state(outputs)

    async def load(self, partition):
        self.state.drop(partition)
        self.processor.forget()
        async for chunk in self.transport.read_state(partition):
            self.state.put_all(partition, chunk)
        self.loaded.add(partition)


def publish_first(transport, topics, changelog_topic, partitions):
    return PublishFirstEngine(
        transport,
        topics=topics,
        changelog_topic=changelog_topic,
        partitions=partitions,
        state=RocksState(temporary_parent=scratch_parent()),
    )


def test_publishing_before_the_state_is_caught_and_the_failing_seed_replays_exactly():
    failures = []
    for seed in range(100):
        try:
            simulate(seed, publish_first)
        except PropertyViolated as error:
            failures.append((seed, str(error)))
    assert len(failures) >= 10, "the simulation should catch outputs published before their state"
    seed, message = failures[0]
    assert f"simulation seed {seed} failed" in message and f"make simulate SEED={seed}" in message
    with pytest.raises(PropertyViolated) as again:
        simulate(seed, publish_first)
    assert str(again.value) == message, "a seed replays exactly"
    assert any("carries two contents" in m or "integrates to" in m for _, m in failures)
