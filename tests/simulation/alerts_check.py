"""The simulation's alerts: rules among the generated events, and a consumer of `ledger.alerts` that
checks them the way finance's consumer checks entries.

Every alert id is published with one content (a repeat after a crash is byte-identical), keyed by its
tenant; none is missing: each rule's published crossings are 1..n without a gap, and n is the count the
processor's durable state holds for that rule once everything is folded (an alert the state counts but
the topic lacks was lost; one the topic has beyond it was published without its state).
"""

from __future__ import annotations

import random
from collections import defaultdict

from ledger.alerts import decode_alert
from ledger.events import AlertRuleRemoved, AlertRuleSet, TopUpRuleSet
from ledger.rules import TenantRules
from tests.simulation.chain_check import PropertyViolated
from tests.simulation.log import SimulatedLog

RULE_PROBABILITY = 0.7  # of a tenant having rules


def with_rules(rng: random.Random, events: list, horizon_ms: int) -> list:
    """The events with rule events of some tenants inserted anywhere (rules may precede any grant)."""
    events = list(events)
    for tenant in sorted({event.tenant_id for event in events}):
        if rng.random() >= RULE_PROBABILITY:
            continue
        rules = [
            AlertRuleSet(
                event_id=f"{tenant}-rule-low", tenant_id=tenant, rule_id="low", kind="balance_below",
                threshold=rng.randint(1, 30), set_at=rng.randint(0, horizon_ms),
            ),
            AlertRuleSet(
                event_id=f"{tenant}-rule-empty", tenant_id=tenant, rule_id="empty", kind="depleted", set_at=0
            ),
            AlertRuleSet(
                event_id=f"{tenant}-rule-soon", tenant_id=tenant, rule_id="soon", kind="grant_expiring",
                window_ms=rng.randint(1, 100), set_at=0,
            ),
            AlertRuleSet(
                event_id=f"{tenant}-rule-pct", tenant_id=tenant, rule_id="pct", kind="balance_below_percent",
                threshold=rng.randint(1, 100), set_at=0,
            ),
            TopUpRuleSet(
                event_id=f"{tenant}-rule-auto", tenant_id=tenant, rule_id="auto", set_at=0,
                threshold=rng.randint(1, 20), amount=rng.randint(1, 10), category="promotional",
                monthly_count_max=rng.randint(1, 3),
            ),
        ]  # fmt: skip
        chosen = rng.sample(rules, rng.randint(1, len(rules)))
        if rng.random() < 0.3:  # removed, and set again later under the same id
            removed = AlertRuleRemoved(
                event_id=f"{tenant}-rule-low-removed", tenant_id=tenant, rule_id="low", removed_at=1
            )
            again = AlertRuleSet(
                event_id=f"{tenant}-rule-low-again", tenant_id=tenant, rule_id="low", kind="balance_below",
                threshold=rng.randint(1, 30), set_at=2,
            )  # fmt: skip
            chosen += [removed, again]
        for rule in chosen:
            events.insert(rng.randint(0, len(events)), rule)
    return events


class AlertObserver:
    """A consumer of `ledger.alerts`: one content per alert id, the crossings each rule published."""

    def __init__(self, log: SimulatedLog, topic: str) -> None:
        self.log = log
        self.topic = topic
        self.positions: dict[int, int] = defaultdict(int)
        self.published: dict[str, bytes] = {}
        self.crossings: dict[tuple[str, str], set[int]] = defaultdict(set)

    def consume(self) -> None:
        for partition in range(self.log.partitions):
            records = self.log.partition_log(self.topic, partition)
            start, self.positions[partition] = self.positions[partition], len(records)
            for record in records[start:]:
                alert = decode_alert(record.value)
                if record.key != alert.tenant_id.encode():
                    raise PropertyViolated(f"alert {alert.alert_id} keyed {record.key!r}")
                first = self.published.setdefault(alert.alert_id, record.value)
                if first != record.value:
                    raise PropertyViolated(f"alert {alert.alert_id} published with two contents")
                self.crossings[(alert.tenant_id, alert.rule_id)].add(alert.crossing)

    def check_complete(self, tenant_id: str, rules: TenantRules | None) -> None:
        """Once everything is folded and published: each rule's crossings 1..n, n as the state counts."""
        counted = {rule_id: state.crossings for rule_id, state in rules.state.rules.items()} if rules else {}
        published = {rule: seen for (tenant, rule), seen in self.crossings.items() if tenant == tenant_id}
        for rule_id in sorted(set(counted) | set(published)):
            seen = published.get(rule_id, set())
            expected = set(range(1, counted.get(rule_id, 0) + 1))
            if seen != expected:
                missing, extra = sorted(expected - seen), sorted(seen - expected)
                raise PropertyViolated(
                    f"{tenant_id} rule {rule_id}: alerts missing {missing[:5]}, unexplained {extra[:5]}"
                )

    @property
    def count(self) -> int:
        return len(self.published)
