"""The processor evaluates each tenant's rules as it folds: alerts ride in the tenant's outbox with the
state that produced them, so a crash republishes them byte for byte and a replay derives the same ids."""

from __future__ import annotations

import random

import msgspec
import pytest

from ledger.alerts import decode_alert
from ledger.codec import encode_event
from ledger.events import AlertRuleSet, CreditGranted, TopUpRuleSet, UsageRecorded
from streams.processor import LedgerProcessor, decode_account_record
from streams.records import LogRecord
from streams.replay import DictState

TOPIC = "ledger.events"
T = "acme"
DAY_MS = 24 * 3600 * 1000


def grant(grant_id, amount, effective_at=0, expires_at=None, tenant=T):
    return CreditGranted(
        event_id=f"e-{grant_id}", tenant_id=tenant, grant_id=grant_id, amount=amount,
        effective_at=effective_at, expires_at=expires_at,
    )  # fmt: skip


def usage(n, amount, at, tenant=T):
    return UsageRecorded(
        event_id=f"u-{tenant}-{n}", tenant_id=tenant, amount=amount, occurred_at=at, model="m"
    )


def rules():
    return [
        AlertRuleSet(
            event_id="r1", tenant_id=T, rule_id="low", kind="balance_below", threshold=300, set_at=0
        ),
        AlertRuleSet(event_id="r2", tenant_id=T, rule_id="empty", kind="depleted", set_at=0),
        AlertRuleSet(
            event_id="r3", tenant_id=T, rule_id="soon", kind="grant_expiring", window_ms=DAY_MS, set_at=0
        ),
        TopUpRuleSet(
            event_id="r4", tenant_id=T, rule_id="auto", threshold=200, amount=400, price=900, currency="USD",
            monthly_count_max=2, set_at=0,
        ),  # fmt: skip
    ]


def history(seed: int) -> list:
    """A tenant with rules and a tenant without, usage that crosses the thresholds, a top-up grant."""
    rng = random.Random(seed)
    events = [
        grant("g1", 1_000, expires_at=40 * DAY_MS),
        grant("later", 100, effective_at=20 * DAY_MS, expires_at=30 * DAY_MS),  # untouched by the usage
        grant("b1", 1_000, tenant="bare"),
        *rules(),
    ]
    for n in range(40):
        events.append(usage(n, rng.randint(10, 60), 1_000 * (n + 1)))
        events.append(usage(n, rng.randint(10, 60), 1_000 * (n + 1), tenant="bare"))
        if n == 25:
            events.append(grant("topup:auto:1", 400, effective_at=1_000 * n))
    return events


def records(events):
    return [
        LogRecord(TOPIC, 0, n, e.tenant_id.encode(), encode_event(e), 1_000 + n) for n, e in enumerate(events)
    ]


class Run:
    """Folds records in batches and sweeps, crashing where asked; `published` keeps every alert by id."""

    def __init__(self) -> None:
        self.state = DictState()
        self.processor = LedgerProcessor(self.state, source_topic=TOPIC)
        self.published: dict[str, bytes] = {}
        self.keys: set[bytes] = set()

    def step(self, output, crash: str) -> None:
        if crash == "before_state":
            return self.restart()
        self.state.write_all(output.state_writes)
        if crash == "after_state":
            return self.restart()
        for record in output.alerts:
            alert = decode_alert(record.value)
            self.keys.add(record.key)
            assert self.published.setdefault(alert.alert_id, record.value) == record.value, alert.alert_id

    def restart(self) -> None:
        self.processor = LedgerProcessor(self.state, source_topic=TOPIC)
        for _, output in self.processor.recover(1, {0}):
            self.step(output, "none")

    def fold(self, all_records, batch: int, crash_every: int, sweep_to: int) -> None:
        start, steps = 0, 0
        while start < len(all_records):
            chunk = all_records[start : start + batch]
            crash = ("before_state", "after_state", "none")[steps % 3] if crash_every else "none"
            steps += 1
            self.step(self.processor.process(0, chunk), crash)
            if crash != "before_state":
                start += batch  # else the same records are redelivered and folded again
        for _, output in self.processor.expire_quiet(sweep_to, 1):
            self.step(output, "none")


def kinds(published: dict[str, bytes]) -> list[tuple[str, str]]:
    alerts = sorted((decode_alert(v) for v in published.values()), key=lambda a: (a.rule_id, a.crossing))
    return [(a.rule_id, a.kind) for a in alerts]


@pytest.mark.parametrize("seed", range(4))
def test_alerts_fire_once_and_a_replay_or_crashes_derive_the_same_bytes(seed):
    all_records = records(history(seed))
    clean = Run()
    clean.fold(all_records, batch=len(all_records), crash_every=0, sweep_to=29 * DAY_MS + 1)
    assert clean.keys == {T.encode()}, "alerts only for the tenant with rules, keyed by it"
    fired = kinds(clean.published)
    assert ("low", "balance_below") in fired and ("empty", "depleted") in fired
    assert ("auto", "top_up") in fired and ("soon", "grant_expiring") in fired
    top_ups = [decode_alert(v) for v in clean.published.values() if decode_alert(v).kind == "top_up"]
    assert {(a.top_up_amount, a.top_up_price, a.top_up_currency) for a in top_ups} == {(400, 900, "USD")}
    batched = Run()
    batched.fold(all_records, batch=7, crash_every=1, sweep_to=29 * DAY_MS + 1)
    assert batched.published == clean.published
    replay = Run()
    replay.fold(all_records, batch=3, crash_every=0, sweep_to=29 * DAY_MS + 1)
    assert replay.published == clean.published


def test_a_crash_after_the_state_write_republishes_the_alert_byte_for_byte():
    run = Run()
    events = [grant("g1", 1_000), rules()[0], usage(1, 800, 5)]
    output = run.processor.process(0, records(events))
    [alert] = output.alerts
    run.state.write_all(output.state_writes)
    stored = decode_account_record(run.state.get(b"a/" + T.encode()))
    assert stored.rules is not None and stored.rules.rules["low"].crossings == 1
    restarted = LedgerProcessor(run.state, source_topic=TOPIC)
    [(_, again)] = restarted.recover(1, {0})
    assert again.alerts == [alert]


def test_a_tenant_without_rules_stores_none_and_old_records_still_decode():
    state = DictState()
    output = LedgerProcessor(state, source_topic=TOPIC).process(0, records([grant("g1", 10)]))
    state.write_all(output.state_writes)
    assert output.alerts == []
    value = state.get(b"a/" + T.encode())
    assert decode_account_record(value).rules is None
    older = msgspec.msgpack.encode(msgspec.msgpack.decode(value)[:6])  # a record written before rules
    assert decode_account_record(older).rules is None


def test_a_sweep_fires_grant_expiring_as_time_passes():
    state = DictState()
    processor = LedgerProcessor(state, source_topic=TOPIC)
    output = processor.process(0, records([grant("g1", 100, expires_at=10 * DAY_MS), rules()[2]]))
    state.write_all(output.state_writes)
    assert output.alerts == []
    [(_, swept)] = processor.expire_quiet(9 * DAY_MS + 1, 1)
    [alert] = [decode_alert(r.value) for r in swept.alerts]
    assert (alert.kind, alert.grant_id, alert.fired_at) == ("grant_expiring", "g1", 9 * DAY_MS + 1)
    assert processor.tenant_position(T)[1] == 9 * DAY_MS + 1
    assert processor.expire_quiet(9 * DAY_MS + 2, 1) == []


def test_every_engine_publishes_the_alerts_to_ledger_alerts_keyed_by_the_tenant():
    """The faust engine's outgoing records (the batch engine and the embedded driver are exercised by the
    simulation and tests/alerts/test_topup_agent.py): the alerts go to ledger.alerts with the others."""
    from streams.faust_app import outgoing_records
    from streams.topics import LedgerTopics

    output = LedgerProcessor(DictState(), source_topic=TOPIC).process(
        0, records([grant("g1", 1_000), rules()[0], usage(1, 800, 5)])
    )
    topics = LedgerTopics(
        events=TOPIC, entries="ledger.entries", balances="ledger.balances", dlq="ledger.dlq"
    )
    alerts = [r for r in outgoing_records(topics, [output]) if r.topic == topics.alerts]
    assert [(r.key, decode_alert(r.value).kind) for r in alerts] == [(T.encode(), "balance_below")]
