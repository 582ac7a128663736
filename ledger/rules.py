"""A tenant's alert and auto top-up rules, folded from the rule events, and their crossing state.

Pure: no I/O, no clock. The processor keeps one `TenantRules` per tenant that has ever had a rule, stored in
the tenant's account record (its `state`), applies the tenant's rule events to it in log order, and after
each applied event and each sweep calls `evaluate` with the settled balance at the tenant's stream time.

Crossings. A balance rule (balance_below, balance_below_percent, depleted) fires when its condition
becomes true, not while it stays true, and fires `recovered` when it becomes false again. A
grant_expiring rule fires once per (rule, grant) when a grant with credit left expires within its window.
A top-up rule fires `top_up` when the balance falls below its threshold and the calendar month's caps
(UTC, by stream time) allow; the top-up agent grants `top_up_amount` on the alert's terms.

Each alert's id is `{tenant}:{rule}:{crossing}`, `crossing` counting that rule's alerts from 1
(ledger.alerts); alert and top-up rules share one namespace of rule ids (setting one replaces the other)
and a removed rule keeps its count, so an id is never derived twice, whatever rules come and go.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import NamedTuple

import msgspec

from ledger.alerts import AlertFired, alert_id_of
from ledger.events import (
    PERCENT_MAX,
    AlertRuleRemoved,
    AlertRuleSet,
    RuleEvent,
    TopUpRuleRemoved,
    TopUpRuleSet,
)

MS_PER_S = 1000


class ExpiringBlock(NamedTuple):
    """A block that counts at the stream time, with credit left and an expiry."""

    grant_id: str
    expires_at: int
    remaining: int


class RuleState(msgspec.Struct, kw_only=True):
    """One rule id: its current rule (at most one of `alert` and `top_up`; neither once removed) and what
    it has fired."""

    rule_id: str
    alert: AlertRuleSet | None = None
    top_up: TopUpRuleSet | None = None
    crossings: int = 0  # alerts fired under this rule id, all rules it has held included
    below: bool = False  # a balance or top-up rule: its condition held at the last evaluation
    alerted_grants: list[str] = []  # grant_expiring: the grants already alerted
    month: int = -1  # top-up: the month (year * 12 + month - 1, UTC) that month_count and month_price count
    month_count: int = 0
    month_price: int = 0


class RulesState(msgspec.Struct, kw_only=True):
    """A tenant's rules, in the order first set (removed ones kept for their counts)."""

    rules: dict[str, RuleState] = {}
    event_ids: list[str] = []  # the rule events applied: one resent by a producer is not applied again


class TenantRules:
    """The rules of one tenant and their crossing state. Not thread-safe."""

    __slots__ = ("tenant_id", "state")

    def __init__(self, tenant_id: str, state: RulesState | None = None) -> None:
        self.tenant_id = tenant_id
        self.state = state if state is not None else RulesState()

    # ------------------------------------------------------------------------------------------ rules

    def apply(self, event: RuleEvent) -> None:
        """Fold one rule event in (log order). Removing a rule that is not there changes nothing; an event
        applied before (a resend) changes nothing either."""
        assert event.tenant_id == self.tenant_id, f"rule of {event.tenant_id} applied to {self.tenant_id}"
        if event.event_id in self.state.event_ids:
            return
        self.state.event_ids.append(event.event_id)
        rules = self.state.rules
        rule = rules.get(event.rule_id)
        if rule is None:
            if type(event) in (AlertRuleRemoved, TopUpRuleRemoved):
                return
            rule = rules[event.rule_id] = RuleState(rule_id=event.rule_id)
        kind = type(event)
        if kind is AlertRuleSet:
            if rule.alert is None or _definition(rule.alert) != _definition(event):
                rule.below = False
            rule.alert, rule.top_up = event, None
        elif kind is TopUpRuleSet:
            if rule.top_up is None or rule.top_up.threshold != event.threshold:
                rule.below = False
            rule.alert, rule.top_up = None, event
        elif kind is AlertRuleRemoved:
            if rule.alert is not None:
                rule.alert, rule.below = None, False
        else:
            assert kind is TopUpRuleRemoved, f"not a rule event: {kind.__name__}"
            if rule.top_up is not None:
                rule.top_up, rule.below = None, False

    def alert_rules(self) -> list[AlertRuleSet]:
        return [rule.alert for rule in self.state.rules.values() if rule.alert is not None]

    def top_up_rules(self) -> list[TopUpRuleSet]:
        return [rule.top_up for rule in self.state.rules.values() if rule.top_up is not None]

    # ------------------------------------------------------------------------------------- evaluation

    def evaluate(
        self, balance: int, granted_total: int, expiring_blocks: Iterable[ExpiringBlock], stream_time: int
    ) -> list[AlertFired]:
        """The alerts the tenant's rules fire now: `balance` is the settled balance at `stream_time`,
        `granted_total` the credit of the blocks that count then, `expiring_blocks` those with an expiry
        and credit left. Updates the crossing state."""
        assert balance >= 0 and granted_total >= balance, f"balance {balance} of granted {granted_total}"
        fired: list[AlertFired] = []
        expiring = list(expiring_blocks)
        for rule in self.state.rules.values():
            if rule.alert is not None:
                if rule.alert.kind == "grant_expiring":
                    self._grants_expiring(rule, rule.alert, expiring, balance, stream_time, fired)
                else:
                    self._balance_rule(rule, rule.alert, balance, granted_total, stream_time, fired)
            elif rule.top_up is not None:
                self._top_up(rule, rule.top_up, balance, stream_time, fired)
        return fired

    def _balance_rule(
        self,
        rule: RuleState,
        alert: AlertRuleSet,
        balance: int,
        granted_total: int,
        stream_time: int,
        fired: list[AlertFired],
    ) -> None:
        holds = _condition(alert, balance, granted_total)
        if holds == rule.below:
            return
        rule.below = holds
        kind = alert.kind if holds else "recovered"
        fired.append(self._alert(rule, kind, stream_time, balance, threshold=alert.threshold))

    def _grants_expiring(
        self,
        rule: RuleState,
        alert: AlertRuleSet,
        expiring: list[ExpiringBlock],
        balance: int,
        stream_time: int,
        fired: list[AlertFired],
    ) -> None:
        window_ms = alert.window_ms
        assert window_ms is not None, "a grant_expiring rule has a window"
        for block in expiring:
            if (
                block.remaining > 0
                and stream_time < block.expires_at <= stream_time + window_ms
                and block.grant_id not in rule.alerted_grants
            ):
                rule.alerted_grants.append(block.grant_id)
                fired.append(
                    self._alert(
                        rule,
                        "grant_expiring",
                        stream_time,
                        balance,
                        grant_id=block.grant_id,
                        expires_at=block.expires_at,
                        remaining=block.remaining,
                    )
                )

    def _top_up(
        self, rule: RuleState, top_up: TopUpRuleSet, balance: int, stream_time: int, fired: list[AlertFired]
    ) -> None:
        holds = balance < top_up.threshold
        if holds == rule.below:
            return
        rule.below = holds
        if not holds:
            return
        month = month_of(stream_time)
        if month != rule.month:
            rule.month, rule.month_count, rule.month_price = month, 0, 0
        amount = top_up_amount(top_up, balance)
        price = top_up_price(top_up, amount)
        if top_up.monthly_count_max is not None and rule.month_count >= top_up.monthly_count_max:
            return
        price_max = top_up.monthly_price_max
        if price_max is not None and rule.month_price + (price or 0) > price_max:
            return
        rule.month_count += 1
        rule.month_price += price or 0
        assert amount > 0 and (price is None or price >= 0), f"top-up of {amount} for {price}"
        fired.append(
            self._alert(
                rule,
                "top_up",
                stream_time,
                balance,
                threshold=top_up.threshold,
                top_up_amount=amount,
                top_up_category=top_up.category,
                top_up_price=price,
                top_up_currency=top_up.currency,
            )
        )

    def _alert(self, rule: RuleState, kind: str, stream_time: int, balance: int, **fields) -> AlertFired:
        rule.crossings += 1
        return AlertFired(
            alert_id=alert_id_of(self.tenant_id, rule.rule_id, rule.crossings),
            tenant_id=self.tenant_id,
            rule_id=rule.rule_id,
            kind=kind,  # type: ignore[arg-type]
            crossing=rule.crossings,
            fired_at=stream_time,
            balance=balance,
            **fields,
        )


def rules_of(tenant_id: str, events: Iterable[RuleEvent]) -> TenantRules:
    """A tenant's rules as folded from its rule events in log order (the admin API's read)."""
    rules = TenantRules(tenant_id)
    for event in events:
        rules.apply(event)
    return rules


def month_of(stream_time: int) -> int:
    """The calendar month (UTC) of a stream time, as year * 12 + month - 1."""
    day = datetime.fromtimestamp(stream_time // MS_PER_S, tz=UTC)
    return day.year * 12 + day.month - 1


def top_up_amount(rule: TopUpRuleSet, balance: int) -> int:
    """The credits a top-up grants at `balance` (below the rule's threshold)."""
    if rule.amount is not None:
        return rule.amount
    assert rule.target is not None and rule.target > balance, f"target {rule.target} at balance {balance}"
    return rule.target - balance


def top_up_price(rule: TopUpRuleSet, amount: int) -> int | None:
    """The price of a top-up of `amount` credits: the rule's price, prorated for a target rule (rounded
    down, so a top-up never costs more than the rule says)."""
    if rule.price is None:
        return None
    if rule.amount is not None:
        return rule.price
    assert rule.target is not None and amount <= rule.target, f"top-up of {amount} above target {rule.target}"
    return rule.price * amount // rule.target


def _definition(rule: AlertRuleSet) -> tuple:
    return (rule.kind, rule.threshold, rule.window_ms)


def _condition(rule: AlertRuleSet, balance: int, granted_total: int) -> bool:
    if rule.kind == "depleted":
        return balance <= 0
    threshold = rule.threshold
    assert threshold is not None, f"a {rule.kind} rule has a threshold"
    if rule.kind == "balance_below":
        return balance < threshold
    assert rule.kind == "balance_below_percent" and threshold <= PERCENT_MAX
    return granted_total > 0 and balance * PERCENT_MAX < threshold * granted_total
