"""Money on entries against the oracle: for every paid grant, after every arrival (any order, duplicates,
late grants and voids, advances), the money its entries carry is what the definitions say, and
recognised + breakage + voided + deferred == price, exactly."""

from __future__ import annotations

from collections import defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.codec import decode_event, encode_event
from ledger.entries import AllocationCorrected, CreditVoided, EndCorrected, UsageAllocated
from ledger.events import CreditExpired, CreditGranted, GrantVoided, InvalidEvent, UsageRecorded
from ledger.revenue import recognised
from ledger.snapshot import account_from_bytes, account_to_bytes
from ledger.tenant import TenantLedger
from tests.ledger import oracle

TENANT = "tenant-m"
TIME_MAX = 200
V1_GRANT = (
    b'{"type":"credit_granted","event_id":"e","tenant_id":"t","grant_id":"g","amount":5,"effective_at":0}'
)


@st.composite
def paid_histories(draw):
    events = []
    for number in range(draw(st.integers(1, 5))):
        effective_at = draw(st.integers(0, TIME_MAX // 2))
        expires_at = draw(st.one_of(st.none(), st.integers(effective_at + 1, effective_at + TIME_MAX // 2)))
        paid = draw(st.booleans())
        events.append(
            CreditGranted(
                event_id=f"grant-event-{number}",
                tenant_id=TENANT,
                grant_id=f"g{number}",
                amount=draw(st.integers(1, 30)),
                effective_at=effective_at,
                expires_at=expires_at,
                priority=draw(st.integers(0, 2)),
                category="paid" if paid else "promotional",
                price=draw(st.integers(0, 10_000)) if paid else None,
                currency="EUR" if paid else None,
            )
        )
        if draw(st.integers(0, 3)) == 0:
            voided_at = draw(st.integers(0, TIME_MAX))
            events.append(
                GrantVoided(
                    event_id=f"void-{number}", tenant_id=TENANT, grant_id=f"g{number}", voided_at=voided_at
                )
            )
    for number in range(draw(st.integers(0, 25))):
        events.append(
            UsageRecorded(
                event_id=f"usage-{number}",
                tenant_id=TENANT,
                amount=draw(st.integers(0, 12)),
                occurred_at=draw(st.integers(0, TIME_MAX)),
                model="m",
            )
        )
    duplicates = draw(st.lists(st.sampled_from(events), max_size=3))
    arrivals = draw(st.permutations(events + duplicates))
    advances = [draw(st.one_of(st.none(), st.integers(0, TIME_MAX + 1))) for _ in arrivals]
    return arrivals, advances


def money_of_entries(entries) -> dict[str, list[int]]:
    """Per grant: [recognised, breakage, voided] summed from the entries, corrections included."""
    money: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    end_kind: dict[str, int] = {}
    for entry in entries:
        if isinstance(entry, (UsageAllocated, AllocationCorrected)):
            for allocation in entry.allocations:
                money[allocation.grant_id][0] += allocation.money
        elif isinstance(entry, CreditExpired):
            end_kind[entry.event_id] = 1
            money[entry.grant_id][1] += entry.money
        elif isinstance(entry, CreditVoided):
            end_kind[entry.entry_id] = 2
            money[entry.grant_id][2] += entry.money
        elif isinstance(entry, EndCorrected):
            money[entry.grant_id][end_kind[entry.corrects]] += entry.money_delta
    return money


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(paid_histories())
def test_the_money_on_entries_is_the_oracles_at_every_arrival(history):
    arrivals, advances = history
    ledger = TenantLedger(TENANT)
    entries, applied = [], []
    stream_time = -1
    for event, advance in zip(arrivals, advances, strict=True):
        entries += ledger.apply(event)
        applied.append(event)
        if advance is not None:
            entries += ledger.advance_to(advance)
            stream_time = max(stream_time, advance)
        if advance == 0:  # now and then through a snapshot: the money state survives it
            ledger.account = account_from_bytes(account_to_bytes(ledger.account))
        ledger.account.check_invariants()
        summed = money_of_entries(entries)
        for grant_id, (price, recognised_money, breakage, voided, deferred) in oracle.grant_money(
            applied, stream_time
        ).items():
            assert summed[grant_id] == [recognised_money, breakage, voided], grant_id
            assert recognised_money + breakage + voided + deferred == price
            assert deferred >= 0


def test_cumulative_rounding_loses_nothing():
    """A grant of 3 credits for 100 cents consumed one credit at a time recognises 33, 33, 34."""
    ledger = TenantLedger(TENANT)
    grant = CreditGranted(
        event_id="e",
        tenant_id=TENANT,
        grant_id="g",
        amount=3,
        effective_at=0,
        category="paid",
        price=100,
        currency="USD",
    )
    ledger.apply(grant)
    moneys = []
    for n in range(3):
        (entry,) = ledger.apply(
            UsageRecorded(event_id=f"u{n}", tenant_id=TENANT, amount=1, occurred_at=n, model="m")
        )
        moneys.append(entry.allocations[0].money)
    assert moneys == [33, 33, 34]
    assert recognised(100, 3, 2) == 66


def test_a_version_1_grant_decodes_as_promotional_and_moves_no_money():
    old = V1_GRANT[:-1] + b',"schema_version":1}'
    grant = decode_event(old)
    assert (grant.category, grant.price, grant.currency, grant.reference, grant.schema_version) == (
        "promotional",
        None,
        None,
        "",
        1,
    )
    ledger = TenantLedger("t")
    ledger.apply(grant)
    (entry,) = ledger.apply(UsageRecorded(event_id="u", tenant_id="t", amount=2, occurred_at=1, model="m"))
    assert entry.allocations[0].money == 0


def test_paid_grants_need_a_price_and_promotional_ones_refuse_one():
    paid = V1_GRANT[:-1] + b',"category":"paid"}'
    promo = V1_GRANT[:-1] + b',"price":3}'
    bad_currency = paid[:-1] + b',"price":3,"currency":"usd"}'
    for data in (paid, promo, bad_currency):
        try:
            decode_event(data)
        except InvalidEvent:
            continue
        raise AssertionError(f"accepted {data!r}")
    good = decode_event(paid[:-1] + b',"price":3,"currency":"USD","reference":"INV-1"}')
    assert decode_event(encode_event(good)) == good


def test_a_replayed_grant_with_another_price_conflicts():
    ledger = TenantLedger(TENANT)
    terms = dict(
        event_id="e",
        tenant_id=TENANT,
        grant_id="g",
        amount=3,
        effective_at=0,
        category="paid",
        currency="USD",
    )
    ledger.apply(CreditGranted(**terms, price=100))
    assert ledger.apply(CreditGranted(**terms, price=100)) == []
    try:
        ledger.apply(CreditGranted(**terms, price=101))
    except InvalidEvent:
        return
    raise AssertionError("a grant replayed with another price was accepted")
