"""The transport-free processor: order independence, dedupe by offset and by event id, crash points,
dead letters. Kafka-level behaviour is in test_faust_processor.py."""

from __future__ import annotations

import random

import msgspec
import pytest

from ledger.codec import encode_event
from ledger.events import CreditGranted, GrantVoided, UsageRecorded
from ledger.tenant import Book
from streams.processor import LedgerProcessor
from streams.records import BalanceRecord, DeadLetter, LogRecord
from streams.replay import DictState

TOPIC = "ledger.events"
NOW = 1_800_000_000_000


def events_for(tenant: str, usage_count: int, seed: int):
    rng = random.Random(seed)
    events = [
        CreditGranted(
            event_id=f"{tenant}-g{n}",
            tenant_id=tenant,
            grant_id=f"{tenant}-g{n}",
            amount=rng.randint(50, 500),
            effective_at=NOW + rng.randint(0, 5_000),
            expires_at=rng.choice([None, NOW + rng.randint(6_000, 20_000)]),
        )
        for n in range(4)
    ]
    events.append(
        GrantVoided(event_id=f"{tenant}-v", tenant_id=tenant, grant_id=f"{tenant}-g0", voided_at=NOW + 9_000)
    )
    events += [
        UsageRecorded(
            event_id=f"{tenant}-r{n}",
            tenant_id=tenant,
            amount=rng.randint(1, 40),
            occurred_at=NOW + rng.randint(0, 25_000),
            model="m",
            prompt_tokens=3,
            completion_tokens=5,
        )
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
    clean_last, clean_entries = run_all(
        LedgerProcessor(clean_state, source_topic=TOPIC), clean_state, records, batch=10
    )

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
        (
            b'{"type":"usage_recorded","event_id":"r","tenant_id":"acme","amount":-5,"occurred_at":1,"model":"m"}',
            b"acme",
            "amount",
        ),
        (
            encode_event(UsageRecorded(event_id="r", tenant_id="acme", amount=1, occurred_at=1, model="m")),
            b"other",
            "does not match",
        ),
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
    grant = CreditGranted(
        event_id="e1", tenant_id="acme", grant_id="g", amount=5, effective_at=NOW, expires_at=NOW + 10
    )
    state = DictState()
    processor = LedgerProcessor(state, source_topic=TOPIC)
    state.write_all(
        processor.process(0, [LogRecord(TOPIC, 0, 0, b"acme", encode_event(grant), NOW)]).state_writes
    )
    assert processor.advance(["acme"], NOW + 5).entries == []
    output = processor.advance(processor.known_tenants(), NOW + 10)
    assert [msgspec.json.decode(e.value)["type"] for e in output.entries] == ["credit_expired"]
    assert balances(output)["acme"].balance == 0


def usage(tenant, event_id, amount=7):
    return UsageRecorded(
        event_id=event_id,
        tenant_id=tenant,
        amount=amount,
        occurred_at=NOW + 1,
        model="m",
        prompt_tokens=3,
        completion_tokens=4,
    )


def test_usage_for_a_tenant_without_any_grant_is_dead_lettered_not_billed_as_overage():
    grant = CreditGranted(event_id="e1", tenant_id="acme", grant_id="g", amount=50, effective_at=NOW)
    records = as_records([usage("ghost", "r0"), grant, usage("acme", "r1"), usage("ghost", "r2")])
    state = DictState()
    processor = LedgerProcessor(state, source_topic=TOPIC)
    output = processor.process(0, records)
    letters = [msgspec.json.decode(r.value, type=DeadLetter) for r in output.dead_letters]
    assert [(letter.offset, letter.reason) for letter in letters] == [
        (0, "unknown tenant ghost"),
        (3, "unknown tenant ghost"),
    ]
    assert [r.key for r in output.dead_letters] == [b"ghost", b"ghost"]
    assert set(balances(output)) == {"acme"} and balances(output)["acme"].balance == 43
    assert not any(b"ghost" in key for key, _ in output.state_writes), (
        "nothing of the unknown tenant is stored"
    )
    assert output.applied_events == 2

    state.write_all(output.state_writes)
    restarted = LedgerProcessor(state, source_topic=TOPIC)
    later = restarted.process(0, as_records([usage("acme", "r3"), usage("ghost", "r4")], start_offset=4))
    assert [msgspec.json.decode(r.value)["reason"] for r in later.dead_letters] == ["unknown tenant ghost"]
    assert balances(later)["acme"].balance == 36, "a known tenant's snapshot read back is not unknown"


def test_usage_after_the_tenants_first_grant_is_folded_even_before_the_grant_is_effective():
    grant = CreditGranted(event_id="e1", tenant_id="acme", grant_id="g", amount=50, effective_at=NOW + 1_000)
    output = LedgerProcessor(DictState(), source_topic=TOPIC).process(
        0, as_records([grant, usage("acme", "r1")])
    )
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
    restarted = LedgerProcessor(
        state, source_topic=TOPIC
    )  # the snapshot written reads back (invariants hold)
    assert restarted.tenant_account("acme")[0].granted_total == 60


# ------------------------------------------------------------------ issue #12: exact under crashes
# The drivers' protocol around the processor (streams.processor): the state, with each touched tenant's
# outbox, is persisted first, then the outputs are published. A crash drops the in-memory processor and
# whatever step had not happened yet; the restarted one reads the durable state back, either all at once
# (`recover`: the batch engine) or tenant by tenant as records or sweeps name them (the faust table).

CRASH_POINTS = ["none", "before_state", "after_state_before_publish"]


class Finance:
    """A consumer of ledger.entries and ledger.balances: one record per entry id, the latest balance."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}
        self.balance: BalanceRecord | None = None

    def read(self, output) -> None:
        for record in output.entries:
            entry = msgspec.json.decode(record.value)
            entry_id = entry.get("entry_id") or entry["event_id"]
            assert self.entries.setdefault(entry_id, record.value) == record.value, (
                f"{entry_id} carries two contents"
            )
        for record in output.balances:
            self.balance = msgspec.json.decode(record.value, type=BalanceRecord)

    def totals(self, grant_id: str) -> tuple[int, int, int]:
        """(consumed, forfeited, voided) of a grant, integrated over the entries kept."""
        consumed = forfeited = voided = 0
        kinds = {}
        for value in self.entries.values():
            entry = msgspec.json.decode(value)
            kind = entry["type"]
            if kind in ("usage_allocated", "allocation_corrected"):
                consumed += sum(a[1] for a in entry["allocations"] if a[0] == grant_id)
            elif entry.get("grant_id") == grant_id and kind in ("credit_expired", "credit_voided"):
                kinds[entry.get("entry_id") or entry["event_id"]] = kind
        for value in self.entries.values():
            entry = msgspec.json.decode(value)
            if entry.get("grant_id") != grant_id:
                continue
            kind = entry["type"] if entry["type"] != "end_corrected" else kinds[entry["corrects"]]
            amount = entry["amount"] if entry["type"] != "end_corrected" else entry["delta"]
            if kind == "credit_expired":
                forfeited += amount
            elif kind == "credit_voided":
                voided += amount
        return consumed, forfeited, voided


class Driver:
    def __init__(self, *, recover_on_start: bool) -> None:
        self.state = DictState()
        self.finance = Finance()
        self.recover_on_start = recover_on_start
        self.offset = 0
        self.processor = LedgerProcessor(self.state, source_topic=TOPIC)

    def append(self, *events) -> list[LogRecord]:
        records = [
            LogRecord(TOPIC, 0, self.offset + n, e.tenant_id.encode(), encode_event(e), 0)
            for n, e in enumerate(events)
        ]
        self.offset += len(events)
        return records

    def fold(self, records, crash: str = "none") -> None:
        self._step(self.processor.process(0, records), crash)

    def sweep(self, now_ms: int, crash: str = "none") -> None:
        for _, output in self.processor.expire_quiet(now_ms, 1):
            self._step(output, crash)

    def _step(self, output, crash: str) -> None:
        if crash == "before_state":
            return self._restart()
        self.state.write_all(output.state_writes)
        if crash == "after_state_before_publish":
            return self._restart()
        self.finance.read(output)

    def _restart(self) -> None:
        self.processor = LedgerProcessor(self.state, source_topic=TOPIC)
        if self.recover_on_start:
            for _, output in self.processor.recover(1, {0}):
                self.finance.read(output)


def grant(grant_id, amount, effective_at, expires_at=None):
    return CreditGranted(
        event_id=f"e-{grant_id}",
        tenant_id="acme",
        grant_id=grant_id,
        amount=amount,
        effective_at=effective_at,
        expires_at=expires_at,
    )


def usage_at(event_id, amount, occurred_at):
    return UsageRecorded(
        event_id=event_id, tenant_id="acme", amount=amount, occurred_at=occurred_at, model="m"
    )


def void(grant_id, voided_at):
    return GrantVoided(event_id=f"void-{grant_id}", tenant_id="acme", grant_id=grant_id, voided_at=voided_at)


@pytest.mark.parametrize("recover_on_start", [True, False], ids=["recover", "lazy"])
@pytest.mark.parametrize("crash", CRASH_POINTS)
def test_a_crash_around_the_state_write_never_refolds_a_published_expiry_into_another_amount(
    crash, recover_on_start
):
    """Defect 1: u2 at 150 publishes credit_expired g0 = 7; the batch redelivered after the crash also holds
    a late u3 of 4 at 60. The truth: 7 consumed, 3 forfeited; the first expiry, if published, is corrected."""
    driver = Driver(recover_on_start=recover_on_start)
    driver.fold(driver.append(grant("g0", 10, 0, 100), usage_at("u1", 3, 50)))
    u2 = driver.append(usage_at("u2", 0, 150))
    driver.fold(u2, crash)
    driver.fold(u2 + driver.append(usage_at("u3", 4, 60)))  # redelivered from the committed offset, regrouped
    assert driver.finance.totals("g0") == (7, 3, 0)
    assert driver.finance.balance.balance == 0


@pytest.mark.parametrize("recover_on_start", [True, False], ids=["recover", "lazy"])
@pytest.mark.parametrize("crash", CRASH_POINTS)
def test_a_sweep_that_published_nothing_leaves_no_stream_time_behind_and_a_replayed_void_is_exact(
    crash, recover_on_start
):
    """Defect 2: a sweep at 50 publishes nothing, a void at 40 follows, crash; after the restart usage u1 of
    4 at 30 arrives and the final sweep runs. The truth: 4 consumed, 6 voided, under one content per id."""
    driver = Driver(recover_on_start=recover_on_start)
    driver.fold(driver.append(grant("g0", 10, 0, 100)))
    driver.sweep(50)
    assert driver.finance.totals("g0") == (0, 0, 0)
    the_void = driver.append(void("g0", 40))
    driver.fold(the_void, crash)
    driver.fold(the_void + driver.append(usage_at("u1", 4, 30)))
    driver.sweep(200)
    assert driver.finance.totals("g0") == (4, 0, 6)


@pytest.mark.parametrize("recover_on_start", [True, False], ids=["recover", "lazy"])
@pytest.mark.parametrize("crash", CRASH_POINTS)
def test_an_expiry_published_by_a_sweep_is_corrected_when_a_late_void_ends_the_grant_earlier(
    crash, recover_on_start
):
    """Defect 3: the sweep publishes credit_expired of a grant of 6, the processor crashes, a late void at 50
    arrives. The grant must count once: voided 6, forfeited 0 (the expiry, if it went out, corrected)."""
    driver = Driver(recover_on_start=recover_on_start)
    driver.fold(driver.append(grant("g0", 6, 0, 100)))
    driver.sweep(150, crash)
    driver.fold(driver.append(void("g0", 50)))
    driver.sweep(200)
    assert driver.finance.totals("g0") == (0, 0, 6)


@pytest.mark.parametrize("crash", CRASH_POINTS)
def test_a_future_grant_without_expiry_publishes_its_balance_when_it_takes_effect(crash):
    """Defect 4: a grant effective at 100 that never expires. The sweep that passes 100 publishes the new
    balance (nothing else would: no end to publish), and that stream time survives a restart."""
    driver = Driver(recover_on_start=True)
    driver.fold(driver.append(grant("g0", 10, 100)))
    assert (driver.finance.balance.balance, driver.finance.balance.as_of) == (0, 0)
    driver.sweep(99)
    assert driver.finance.balance.as_of == 0, "nothing changed before it is effective: nothing published"
    driver.sweep(150, crash)
    driver.sweep(150)  # after a crash, the sweep runs again
    assert (driver.finance.balance.balance, driver.finance.balance.as_of) == (10, 150)
    restarted = LedgerProcessor(driver.state, source_topic=TOPIC)
    assert restarted.tenant_position("acme")[1] == 150, (
        "the sweep's stream time is persisted with the account"
    )
    swept = restarted.expire_quiet(
        150, 1
    )  # sends the stored outbox again (byte for byte), decides nothing anew
    assert [(o.state_writes, o.entries, o.republished_outboxes) for _, o in swept] == [([], [], 1)]


def test_a_stored_outbox_is_carried_into_the_next_account_record_until_it_is_published():
    """A tenant read back with an outbox whose publish never happened, then folded again in a batch whose
    state is written and whose publish is lost too: the second restart still sends the first outbox."""
    driver = Driver(recover_on_start=False)
    driver.fold(
        driver.append(grant("g0", 10, 0, 100), usage_at("u1", 3, 50)), crash="after_state_before_publish"
    )
    driver.fold(driver.append(usage_at("u2", 2, 60)), crash="after_state_before_publish")
    driver.fold(driver.append(usage_at("u3", 1, 70)))
    assert set(driver.finance.entries) == {"acme/granted/g0"} | {f"acme/usage/u{n}" for n in (1, 2, 3)}
    assert driver.finance.totals("g0") == (6, 0, 0) and driver.finance.balance.balance == 4
