"""The transport-free processor: order independence, dedupe by offset and by event id, crash points,
dead letters. Kafka-level behaviour is in test_faust_processor.py."""

from __future__ import annotations

import random

import msgspec
import pytest

from ledger.codec import encode_event
from ledger.events import CreditGranted, GrantVoided, UsageRecorded
from ledger.tenant import Book
from streams.processor import BalanceRecord, DeadLetter, LedgerProcessor
from streams.records import LogRecord
from streams.replay import DictState

TOPIC = "ledger.events"
NOW = 1_800_000_000_000


def events_for(tenant: str, usage_count: int, seed: int):
    rng = random.Random(seed)
    events = [
        CreditGranted(event_id=f"{tenant}-g{n}", tenant_id=tenant, grant_id=f"{tenant}-g{n}", amount=rng.randint(50, 500),
                      effective_at=NOW + rng.randint(0, 5_000), expires_at=rng.choice([None, NOW + rng.randint(6_000, 20_000)]))
        for n in range(4)
    ]
    events.append(GrantVoided(event_id=f"{tenant}-v", tenant_id=tenant, grant_id=f"{tenant}-g0", voided_at=NOW + 9_000))
    events += [
        UsageRecorded(event_id=f"{tenant}-r{n}", tenant_id=tenant, amount=rng.randint(1, 40),
                      occurred_at=NOW + rng.randint(0, 25_000), model="m", prompt_tokens=3, completion_tokens=5)
        for n in range(usage_count)
    ]
    return events


def as_records(events, start_offset=0, partition=0):
    return [
        LogRecord(TOPIC, partition, start_offset + n, e.tenant_id.encode(), encode_event(e), NOW + n)
        for n, e in enumerate(events)
    ]


def shuffled_with_duplicates(events, seed):
    """Any order, with duplicates, after the tenant's first grant: admission needs credit, so usage never
    precedes it on the log (usage for a tenant without a grant is dead-lettered)."""
    rng = random.Random(seed)
    first_grant, rest = events[0], events[1:]
    assert isinstance(first_grant, CreditGranted)
    stream = rest + rng.sample(events, len(events) // 5)
    rng.shuffle(stream)
    return [first_grant, *stream]


def balances(output):
    return {r.key.decode(): msgspec.json.decode(r.value, type=BalanceRecord) for r in output.balances}


def expected(events, tenant, at):
    book = Book()
    for event in {e.event_id: e for e in events}.values():
        book.apply(event)
    return book.tenant(tenant).balance_at(at)


def run_all(processor, state, records, batch):
    last = {}
    entries = []
    for start in range(0, len(records), batch):
        output = processor.process(0, records[start : start + batch])
        state.write_all(output.state_writes)
        last.update(balances(output))
        entries += output.entries
    return last, entries


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_balances_equal_the_pure_fold_whatever_the_order_and_duplicates(seed):
    events = events_for("acme", 60, seed)
    stream = shuffled_with_duplicates(events, seed)
    state = DictState()
    processor = LedgerProcessor(state, source_topic=TOPIC)
    last, entries = run_all(processor, state, as_records(stream), batch=7)
    record = last["acme"]
    assert record.balance == expected(events, "acme", record.as_of)
    usage_ids = {msgspec.json.decode(e.value)["entry_id"] for e in entries if b"usage_allocated" in e.value}
    assert usage_ids == {f"acme/usage/{e.event_id}" for e in events if isinstance(e, UsageRecorded)}


def test_crash_before_state_write_reprocesses_to_the_same_entries_and_state():
    events = events_for("acme", 40, 9)
    records = as_records(shuffled_with_duplicates(events, 9))
    clean_state = DictState()
    clean_last, clean_entries = run_all(LedgerProcessor(clean_state, source_topic=TOPIC), clean_state, records, batch=10)

    state = DictState()
    first = LedgerProcessor(state, source_topic=TOPIC)
    run_all(first, state, records[:20], batch=10)
    lost = first.process(0, records[20:30])  # outputs published, then the process dies before writing state
    restarted = LedgerProcessor(state, source_topic=TOPIC)
    last, entries = run_all(restarted, state, records[20:], batch=10)
    republished = {e.value for e in lost.entries}
    assert republished <= {e.value for e in entries}, "the redone batch publishes the very same entries"
    assert last["acme"] == clean_last["acme"]
    assert state.data == clean_state.data


def test_crash_after_seen_ids_but_before_the_account_snapshot_does_not_drop_or_double_count():
    events = events_for("acme", 30, 4)
    records = as_records(events)
    state = DictState()
    processor = LedgerProcessor(state, source_topic=TOPIC)
    run_all(processor, state, records[:10], batch=10)
    output = processor.process(0, records[10:20])
    seen_only = [(k, v) for k, v in output.state_writes if k.startswith(b"s/")]
    assert seen_only and len(seen_only) < len(output.state_writes)
    state.write_all(seen_only)  # the prefix that reached the changelog
    duplicate_copy = as_records([events[15]], start_offset=100)  # a producer resend, later on the log
    restarted = LedgerProcessor(state, source_topic=TOPIC)
    last, _ = run_all(restarted, state, records[10:] + duplicate_copy, batch=10)
    assert last["acme"].balance == expected(events, "acme", last["acme"].as_of)


def test_records_at_or_below_the_applied_offset_are_skipped():
    events = events_for("acme", 10, 5)
    records = as_records(events)
    state = DictState()
    processor = LedgerProcessor(state, source_topic=TOPIC)
    run_all(processor, state, records, batch=5)
    again = processor.process(0, records[3:8])
    assert again.duplicate_events == 5 and not again.entries and not again.state_writes


@pytest.mark.parametrize(
    ("value", "key", "reason"),
    [
        (b"\x00garbage", b"acme", "undecodable"),
        (b'{"type":"usage_recorded","event_id":"r","tenant_id":"acme","amount":-5,"occurred_at":1,"model":"m"}', b"acme", "amount"),
        (encode_event(UsageRecorded(event_id="r", tenant_id="acme", amount=1, occurred_at=1, model="m")), b"other", "does not match"),
        (None, b"acme", "empty"),
    ],
)
def test_bad_records_become_dead_letters_and_processing_goes_on(value, key, reason):
    good = events_for("acme", 3, 6)
    records = [LogRecord(TOPIC, 0, 0, key, value, NOW)] + as_records(good, start_offset=1)
    state = DictState()
    output = LedgerProcessor(state, source_topic=TOPIC).process(0, records)
    [letter] = [msgspec.json.decode(r.value, type=DeadLetter) for r in output.dead_letters]
    assert reason in letter.reason
    assert (letter.source_topic, letter.partition, letter.offset, letter.value) == (TOPIC, 0, 0, value)
    assert output.applied_events == len(good)


def test_a_conflicting_grant_is_a_dead_letter_not_a_crash():
    grant = CreditGranted(event_id="e1", tenant_id="acme", grant_id="g", amount=5, effective_at=NOW)
    other = CreditGranted(event_id="e2", tenant_id="acme", grant_id="g", amount=9, effective_at=NOW)
    output = LedgerProcessor(DictState(), source_topic=TOPIC).process(0, as_records([grant, other]))
    assert len(output.dead_letters) == 1 and b"already granted" in output.dead_letters[0].value


def test_expiries_of_quiet_tenants_are_published_by_advance():
    grant = CreditGranted(event_id="e1", tenant_id="acme", grant_id="g", amount=5, effective_at=NOW, expires_at=NOW + 10)
    state = DictState()
    processor = LedgerProcessor(state, source_topic=TOPIC)
    state.write_all(processor.process(0, [LogRecord(TOPIC, 0, 0, b"acme", encode_event(grant), NOW)]).state_writes)
    assert processor.advance(["acme"], NOW + 5).entries == []
    output = processor.advance(processor.known_tenants(), NOW + 10)
    assert [msgspec.json.decode(e.value)["type"] for e in output.entries] == ["credit_expired"]
    assert balances(output)["acme"].balance == 0


def usage(tenant, event_id, amount=7):
    return UsageRecorded(event_id=event_id, tenant_id=tenant, amount=amount, occurred_at=NOW + 1, model="m",
                         prompt_tokens=3, completion_tokens=4)


def test_usage_for_a_tenant_without_any_grant_is_dead_lettered_not_billed_as_overage():
    grant = CreditGranted(event_id="e1", tenant_id="acme", grant_id="g", amount=50, effective_at=NOW)
    records = as_records([usage("ghost", "r0"), grant, usage("acme", "r1"), usage("ghost", "r2")])
    state = DictState()
    processor = LedgerProcessor(state, source_topic=TOPIC)
    output = processor.process(0, records)
    letters = [msgspec.json.decode(r.value, type=DeadLetter) for r in output.dead_letters]
    assert [(letter.offset, letter.reason) for letter in letters] == [(0, "unknown tenant ghost"), (3, "unknown tenant ghost")]
    assert [r.key for r in output.dead_letters] == [b"ghost", b"ghost"]
    assert set(balances(output)) == {"acme"} and balances(output)["acme"].balance == 43
    assert not any(b"ghost" in key for key, _ in output.state_writes), "nothing of the unknown tenant is stored"
    assert output.applied_events == 2

    state.write_all(output.state_writes)
    restarted = LedgerProcessor(state, source_topic=TOPIC)
    later = restarted.process(0, as_records([usage("acme", "r3"), usage("ghost", "r4")], start_offset=4))
    assert [msgspec.json.decode(r.value)["reason"] for r in later.dead_letters] == ["unknown tenant ghost"]
    assert balances(later)["acme"].balance == 36, "a known tenant's snapshot read back is not unknown"


def test_usage_after_the_tenants_first_grant_is_folded_even_before_the_grant_is_effective():
    grant = CreditGranted(event_id="e1", tenant_id="acme", grant_id="g", amount=50, effective_at=NOW + 1_000)
    output = LedgerProcessor(DictState(), source_topic=TOPIC).process(0, as_records([grant, usage("acme", "r1")]))
    assert not output.dead_letters
    [allocated] = [msgspec.json.decode(e.value) for e in output.entries if b"usage_allocated" in e.value]
    assert allocated["overage"] == 7, "usage before any block is effective is overage, as before"


def test_a_grant_over_the_tenant_credit_bound_is_a_dead_letter_and_the_rest_of_the_batch_folds(monkeypatch):
    monkeypatch.setattr("ledger.account.TENANT_CREDIT_MAX", 100)
    within = CreditGranted(event_id="e1", tenant_id="acme", grant_id="g1", amount=60, effective_at=NOW)
    over = CreditGranted(event_id="e2", tenant_id="acme", grant_id="g2", amount=50, effective_at=NOW)
    state = DictState()
    processor = LedgerProcessor(state, source_topic=TOPIC)
    output = processor.process(0, as_records([within, over, usage("acme", "r1", amount=10)]))
    [letter] = [msgspec.json.decode(r.value, type=DeadLetter) for r in output.dead_letters]
    assert letter.offset == 1 and "TENANT_CREDIT_MAX" in letter.reason
    assert balances(output)["acme"].balance == 50, "the refused grant left nothing behind; the usage folded"
    state.write_all(output.state_writes)
    restarted = LedgerProcessor(state, source_topic=TOPIC)  # the snapshot written reads back (invariants hold)
    assert restarted.tenant_account("acme")[0].granted_total == 60
