"""ledger.rules: alert and top-up rules fire once per crossing, with ids derived from the rule and the
crossing, and top-ups stay inside their monthly caps. Checked against a reference that recounts the
crossings from the sequence of balances."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.alerts import AlertFired, decode_alert, encode_alert
from ledger.events import AlertRuleRemoved, AlertRuleSet, InvalidEvent, TopUpRuleRemoved, TopUpRuleSet
from ledger.rules import ExpiringBlock, RulesState, TenantRules, month_of, rules_of

T = "acme"
DAY_MS = 24 * 3600 * 1000
GRANTED = 1_000

balances = st.lists(st.integers(min_value=0, max_value=GRANTED), min_size=1, max_size=60)


def below(rule_id="low", threshold=100, kind="balance_below", n=1):
    return AlertRuleSet(
        event_id=f"rule-{rule_id}-{n}", tenant_id=T, rule_id=rule_id, kind=kind, threshold=threshold, set_at=0
    )


def top_up(rule_id="auto", threshold=100, n=1, **terms):
    if "target" not in terms:
        terms.setdefault("amount", 500)
    terms.setdefault("monthly_count_max", 3)
    terms.setdefault("price", 1_000)
    terms.setdefault("currency", "USD")
    return TopUpRuleSet(event_id=f"top-up-{rule_id}-{n}", tenant_id=T, rule_id=rule_id, threshold=threshold,
                        set_at=0, **terms)  # fmt: skip


def run(rules: TenantRules, sequence, start_ms=0, step_ms=1_000) -> list[AlertFired]:
    fired = []
    for i, balance in enumerate(sequence):
        fired += rules.evaluate(balance, GRANTED, [], start_ms + i * step_ms)
    return fired


def expected_transitions(sequence, holds) -> list[bool]:
    """The reference: one entry per change of the condition (True: it became true)."""
    changes, state = [], False
    for balance in sequence:
        if holds(balance) != state:
            state = holds(balance)
            changes.append(state)
    return changes


@given(balances, st.integers(min_value=0, max_value=GRANTED))
def test_a_balance_rule_fires_once_per_crossing_and_recovers_once(sequence, threshold):
    rules = rules_of(T, [below(threshold=threshold)])
    fired = run(rules, sequence)
    changes = expected_transitions(sequence, lambda b: b < threshold)
    assert [a.kind for a in fired] == ["balance_below" if c else "recovered" for c in changes]
    assert [a.crossing for a in fired] == list(range(1, len(fired) + 1))
    assert [a.alert_id for a in fired] == [f"{T}:low:{n}" for n in range(1, len(fired) + 1)]
    assert all(a.threshold == threshold for a in fired)


@given(balances, st.integers(min_value=1, max_value=100))
def test_a_percent_rule_compares_with_the_credit_granted(sequence, percent):
    rules = rules_of(T, [below(kind="balance_below_percent", threshold=percent)])
    fired = run(rules, sequence)
    changes = expected_transitions(sequence, lambda b: b * 100 < percent * GRANTED)
    assert [a.kind for a in fired] == ["balance_below_percent" if c else "recovered" for c in changes]


@given(balances)
def test_depleted_fires_at_zero_and_recovers_above_it(sequence):
    rules = rules_of(
        T, [AlertRuleSet(event_id="d", tenant_id=T, rule_id="empty", kind="depleted", set_at=0)]
    )
    fired = run(rules, sequence)
    changes = expected_transitions(sequence, lambda b: b == 0)
    assert [a.kind for a in fired] == ["depleted" if c else "recovered" for c in changes]


@given(balances, st.integers(min_value=1, max_value=59))
def test_the_state_round_trips_through_its_encoding_without_changing_what_fires(sequence, cut):
    """The processor stores the state in the account record: a restart between any two evaluations fires
    the same alerts, byte for byte."""
    events = [below(), top_up(threshold=300, amount=200)]
    whole = [encode_alert(a) for a in run(rules_of(T, events), sequence)]
    first = rules_of(T, events)
    split = [encode_alert(a) for a in run(first, sequence[:cut])]
    stored = msgspec.msgpack.encode(first.state)
    second = TenantRules(T, msgspec.msgpack.decode(stored, type=RulesState))
    split += [encode_alert(a) for a in run(second, sequence[cut:], start_ms=cut * 1_000)]
    assert split == whole
    assert len({decode_alert(a).alert_id for a in whole}) == len(whole)


@given(
    st.lists(st.tuples(st.integers(0, GRANTED), st.integers(0, 5 * DAY_MS)), min_size=1, max_size=80),
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=0, max_value=5_000),
    st.booleans(),
)
@settings(max_examples=200)
def test_top_ups_fire_at_crossings_inside_the_monthly_caps(steps, count_max, price_max, by_target):
    terms = {"target": 800} if by_target else {"amount": 500}
    rule = top_up(threshold=300, monthly_count_max=count_max, monthly_price_max=price_max, **terms)
    rules = rules_of(T, [rule])
    month_start = 1_769_904_000_000 - 3 * DAY_MS  # 2026-01-29: the walk crosses a month boundary
    time, previous, per_month = month_start, None, {}
    for balance, gap in steps:
        time += gap
        fired = rules.evaluate(balance, GRANTED, [], time)
        crossed = balance < 300 and (previous is None or previous >= 300)
        assert len(fired) <= 1 and (not fired or crossed), "a top-up only when the balance falls below"
        for alert in fired:
            assert alert.kind == "top_up" and alert.fired_at == time
            assert alert.top_up_amount == (800 - balance if by_target else 500)
            assert alert.top_up_price == (1_000 * alert.top_up_amount // 800 if by_target else 1_000)
            count, money = per_month.get(month_of(time), (0, 0))
            per_month[month_of(time)] = (count + 1, money + alert.top_up_price)
        previous = balance
    for count, money in per_month.values():
        assert count <= count_max and money <= price_max


def test_a_capped_month_refuses_and_the_next_month_tops_up_again():
    rules = rules_of(T, [top_up(threshold=300, amount=100, monthly_count_max=1)])
    jan, feb = 1_767_225_600_000, 1_769_904_000_000  # 2026-01-01, 2026-02-01 (UTC)
    assert [a.top_up_amount for a in rules.evaluate(200, GRANTED, [], jan)] == [100]
    assert rules.evaluate(400, GRANTED, [], jan + 1) == []  # recovered: no alert for a top-up rule
    assert rules.evaluate(200, GRANTED, [], jan + 2) == []  # January's one top-up is spent
    assert rules.evaluate(400, GRANTED, [], feb) == []
    [february] = rules.evaluate(200, GRANTED, [], feb + 1)
    assert (february.crossing, february.alert_id) == (2, f"{T}:auto:2")


def test_grant_expiring_fires_once_per_grant_inside_the_window():
    rule = AlertRuleSet(
        event_id="e", tenant_id=T, rule_id="soon", kind="grant_expiring", window_ms=DAY_MS, set_at=0
    )
    rules = rules_of(T, [rule])
    far = ExpiringBlock("g1", 10 * DAY_MS, 50)
    near = ExpiringBlock("g2", 2 * DAY_MS, 50)
    assert rules.evaluate(100, 200, [far, near], 0) == []
    [alert] = rules.evaluate(100, 200, [far, near], DAY_MS)
    assert (alert.grant_id, alert.expires_at, alert.remaining) == ("g2", 2 * DAY_MS, 50)
    assert rules.evaluate(100, 200, [far, near], DAY_MS + 5) == []
    [later] = rules.evaluate(100, 200, [far], 9 * DAY_MS)
    assert (later.grant_id, later.crossing) == ("g1", 2)
    assert rules.evaluate(100, 200, [ExpiringBlock("g3", 9 * DAY_MS + 1, 0)], 9 * DAY_MS) == []


def test_a_rule_removed_and_set_again_never_derives_an_id_twice():
    rules = rules_of(T, [below()])
    ids = [a.alert_id for a in run(rules, [50, 500])]
    rules.apply(AlertRuleRemoved(event_id="rm", tenant_id=T, rule_id="low", removed_at=1))
    assert run(rules, [50]) == [] and rules.alert_rules() == []
    rules.apply(top_up(rule_id="low"))  # the same id, now a top-up rule
    ids += [a.alert_id for a in run(rules, [50, 500])]
    rules.apply(TopUpRuleRemoved(event_id="rm2", tenant_id=T, rule_id="low", removed_at=2))
    rules.apply(below(n=2))
    ids += [a.alert_id for a in run(rules, [50])]
    assert ids == [f"{T}:low:{n}" for n in (1, 2, 3, 4)]


def test_setting_the_same_rule_again_does_not_fire_again():
    rules = rules_of(T, [below()])
    assert len(run(rules, [50])) == 1
    rules.apply(below(n=2))  # the same definition, another event
    assert run(rules, [40]) == []
    rules.apply(below(threshold=60, n=3))  # another threshold: evaluated afresh
    assert [a.kind for a in run(rules, [40])] == ["balance_below"]


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: below(threshold=None), "threshold"),
        (lambda: below(kind="balance_below_percent", threshold=0), "threshold"),
        (lambda: below(kind="balance_below_percent", threshold=101), "threshold"),
        (lambda: AlertRuleSet(event_id="e", tenant_id=T, rule_id="r", kind="grant_expiring", set_at=0),
         "window_ms"),  # fmt: skip
        (lambda: top_up(amount=None), "amount"),
        (lambda: top_up(amount=None, target=50), "target"),
        (lambda: top_up(monthly_count_max=None), "monthly_count_max"),
        (lambda: top_up(price=None), "price"),
        (lambda: top_up(category="promotional"), "price"),
    ],
)
def test_invalid_rules_are_refused_on_construction_naming_the_field(build, field):
    with pytest.raises(InvalidEvent) as raised:
        build()
    assert raised.value.reason.startswith(field)


def test_a_resent_rule_event_is_not_applied_again():
    """A producer resend of an earlier AlertRuleSet after its removal does not bring the rule back."""
    rules = rules_of(T, [below()])
    rules.apply(AlertRuleRemoved(event_id="rm", tenant_id=T, rule_id="low", removed_at=1))
    rules.apply(below())
    assert rules.alert_rules() == []
