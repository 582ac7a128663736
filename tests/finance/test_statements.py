"""Statements from entries: they tie out in credits and money on random histories, agree with the
brute-force oracle, show each model's prompt, completion and cached prompt tokens, and a closed period's
statement never changes, a late event being booked in the first open period as an adjustment."""

from __future__ import annotations

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.entries import UsageAllocated
from ledger.events import PeriodClosed, UsageRecorded, event_order_key
from ledger.statement import OverageRate, encode_statement, statement_of_entries
from ledger.tenant import TenantLedger
from tests.ledger import oracle
from tests.ledger.test_money_properties import TENANT, TIME_MAX, paid_histories

END_OF_TIME = TIME_MAX + 2
TOKEN_MODELS = ("m", "n")


@st.composite
def token_histories(draw):
    """paid_histories with each usage's model, prompt, completion and cached prompt tokens drawn (one
    draw per event id, so a duplicate stays the same event)."""
    arrivals, advances = draw(paid_histories())
    drawn: dict[str, dict] = {}
    for event in arrivals:
        if type(event) is UsageRecorded and event.event_id not in drawn:
            prompt = draw(st.integers(0, 50))
            drawn[event.event_id] = {
                "model": draw(st.sampled_from(TOKEN_MODELS)),
                "prompt_tokens": prompt,
                "completion_tokens": draw(st.integers(0, 50)),
                "cached_prompt_tokens": draw(st.one_of(st.just(0), st.integers(0, prompt))),
            }
    tokened = [
        msgspec.structs.replace(event, **drawn[event.event_id]) if event.event_id in drawn else event
        for event in arrivals
    ]
    return tokened, advances


def tokens_by_model(entries, start: int, end: int) -> dict[str, tuple[int, int, int]]:
    """(prompt, completion, cached prompt) tokens per model of the usage entries in [start, end) that are
    not adjustments, straight from the entries."""
    totals: dict[str, tuple[int, int, int]] = {}
    for e in entries:
        if (
            type(e) is UsageAllocated
            and e.booked_at in (None, e.occurred_at)
            and start <= e.occurred_at < end
        ):
            p, c, cached = totals.get(e.model, (0, 0, 0))
            totals[e.model] = (p + e.prompt_tokens, c + e.completion_tokens, cached + e.cached_prompt_tokens)
    return {model: tokens for model, tokens in totals.items() if any(tokens)}


def statement_tokens(statement) -> dict[str, tuple[int, int, int]]:
    lines = {
        line.key: (line.prompt_tokens, line.completion_tokens, line.cached_prompt_tokens)
        for line in statement.consumption
    }
    return {model: tokens for model, tokens in lines.items() if any(tokens)}


def fold(arrivals, advances):
    ledger = TenantLedger(TENANT)
    entries = []
    for event, advance in zip(arrivals, advances, strict=True):
        entries += ledger.apply(event)
        if advance is not None:
            entries += ledger.advance_to(advance)
    entries += ledger.advance_to(END_OF_TIME)
    return entries


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token_histories(), st.lists(st.integers(0, END_OF_TIME), min_size=1, max_size=4))
def test_statements_tie_out_and_chain_on_random_histories(history, cuts):
    arrivals, advances = history
    entries = fold(arrivals, advances)
    bounds = sorted({0, END_OF_TIME, *cuts})
    rate = OverageRate(2_500_000, "EUR")
    previous = None
    for start, end in zip(bounds, bounds[1:], strict=False):
        statement = statement_of_entries(TENANT, entries, start, end, rate)  # asserts it ties out
        if previous is not None:
            assert statement.opening == previous.closing
        assert statement.overage.priced == statement.overage.credits * 5 // 2
        assert statement_tokens(statement) == tokens_by_model(entries, start, end)
        previous = statement
    whole = statement_of_entries(TENANT, entries, 0, END_OF_TIME)
    assert whole.closing.credits == oracle.balance_at(arrivals, END_OF_TIME - 1)
    deferred = sum(money[4] for money in oracle.grant_money(arrivals, END_OF_TIME).values())
    assert sum(m.amount for m in whole.closing.deferred) == deferred
    assert sum(line.credits for line in whole.consumption) == oracle.totals_at(arrivals, END_OF_TIME)[1]
    assert whole.overage.credits == oracle.overage_at(arrivals, END_OF_TIME)
    assert whole.overage.priced is None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token_histories(), st.lists(st.integers(0, END_OF_TIME), min_size=1, max_size=3))
def test_in_order_statements_match_the_oracle_balance_at_every_cut(history, cuts):
    arrivals, _ = history
    in_order = sorted(oracle.distinct_events(arrivals), key=event_order_key)
    ledger = TenantLedger(TENANT)
    entries = []
    for event in in_order:
        entries += ledger.advance_to(event.timestamp - 1) if event.timestamp > 0 else []
        entries += ledger.apply(event)
    entries += ledger.advance_to(END_OF_TIME)
    for cut in cuts:
        statement = statement_of_entries(TENANT, entries, 0, cut + 1)
        assert statement.closing.credits == oracle.balance_at(in_order, cut)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token_histories(), st.integers(1, TIME_MAX), st.integers(0, 30))
def test_a_closed_periods_statement_never_changes(history, closed_until, split):
    """Close at a random point of a random arrival order: every statement of a window before the close is
    byte-identical after the rest arrives, and whatever arrives late is an adjustment at the close."""
    arrivals, advances = history
    split = min(split, len(arrivals))
    ledger = TenantLedger(TENANT)
    entries = []
    for event, advance in zip(arrivals[:split], advances[:split], strict=True):
        entries += ledger.apply(event)
        if advance is not None:
            entries += ledger.advance_to(advance)
    ledger.apply(PeriodClosed(event_id="close", tenant_id=TENANT, closed_until=closed_until))
    windows = [(0, closed_until), (0, closed_until // 2), (closed_until // 2, closed_until)]
    before = [encode_statement(statement_of_entries(TENANT, entries, *w)) for w in windows]
    late_entries = []
    for event, advance in zip(arrivals[split:], advances[split:], strict=True):
        late_entries += ledger.apply(event)
        if advance is not None:
            late_entries += ledger.advance_to(advance)
    late_entries += ledger.advance_to(END_OF_TIME)
    after = [encode_statement(statement_of_entries(TENANT, entries + late_entries, *w)) for w in windows]
    assert after == before
    assert all((e.booked_at or closed_until) >= closed_until for e in late_entries if hasattr(e, "booked_at"))


NOV = 1_793_491_200_000  # 2026-11-01T00:00:00Z
DEC = 1_796_083_200_000  # 2026-12-01T00:00:00Z
JAN = 1_798_761_600_000  # 2027-01-01T00:00:00Z
OCT_15 = 1_791_936_000_000  # 2026-10-15T00:00:00Z


def test_closing_november_then_a_late_october_usage_lands_in_december_as_an_adjustment():
    from ledger.events import CreditGranted

    ledger = TenantLedger("acme")
    entries = ledger.apply(
        CreditGranted(
            event_id="g-event",
            tenant_id="acme",
            grant_id="g",
            amount=1_000,
            effective_at=OCT_15 - 1,
            category="paid",
            price=50_000,
            currency="USD",
            reference="INV-7",
        )
    )
    entries += ledger.apply(
        UsageRecorded(event_id="u-nov", tenant_id="acme", amount=100, occurred_at=NOV + 5, model="m")
    )
    entries += ledger.apply(PeriodClosed(event_id="close-nov", tenant_id="acme", closed_until=DEC))
    november = encode_statement(statement_of_entries("acme", entries, NOV, DEC))
    late = ledger.apply(
        UsageRecorded(event_id="u-late", tenant_id="acme", amount=10, occurred_at=OCT_15, model="m")
    )
    assert [e.booked_at for e in late] == [DEC]
    entries += late
    assert encode_statement(statement_of_entries("acme", entries, NOV, DEC)) == november
    december = statement_of_entries("acme", entries, DEC, JAN)
    (adjustment,) = december.adjustments
    assert (adjustment.cause_event_id, adjustment.own_time, adjustment.booked_at) == ("u-late", OCT_15, DEC)
    assert (adjustment.credits, [(m.currency, m.amount) for m in adjustment.money]) == (-10, [("USD", -500)])
    assert december.opening.credits == 900 and december.closing.credits == 890
    assert [(m.currency, m.amount) for m in december.closing.deferred] == [("USD", 44_500)]
    assert ledger.balance_at(OCT_15) == 990  # the point-in-time balance at the late event's own time
