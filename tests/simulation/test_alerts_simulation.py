"""The simulation checks alerts as it checks entries, and can fail: a processor that does not republish the
alerts of a stored outbox after a crash loses one, and the seed that shows it names the rule."""

from __future__ import annotations

import logging

import msgspec
import pytest

import streams.processor
from tests.simulation.chain_check import PropertyViolated
from tests.simulation.simulator import simulate

SEEDS = 60


@pytest.fixture(autouse=True)
def quiet_dead_letters():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def test_alerts_are_published_once_per_id_with_one_content_across_seeds():
    published = sum(simulate(seed).alerts.count for seed in range(SEEDS))
    assert published > SEEDS, "the seeds fire alerts (else the property is not exercised)"


def test_a_processor_that_drops_stored_alerts_on_recovery_is_caught(monkeypatch):
    real = streams.processor.stored_outbox

    def without_alerts(record):
        outbox = real(record)
        return None if outbox is None else msgspec.structs.replace(outbox, alerts=[])

    monkeypatch.setattr(streams.processor, "stored_outbox", without_alerts)
    failures = []
    for seed in range(SEEDS):
        try:
            simulate(seed)
        except PropertyViolated as error:
            failures.append(str(error))
            break
    assert failures and "alerts missing" in failures[0]
