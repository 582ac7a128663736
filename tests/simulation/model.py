"""The simulation's two observers: finance reading the output topics, and the brute-force truth.

`Finance` consumes `ledger.entries`, `ledger.checkpoints` and `ledger.balances` the way the README tells
finance to: one record per entry id (a repeat must be byte-identical, or the property is broken), the
latest balance per tenant.

`LedgerModel` says what is true from the source log alone, with the brute-force replay oracle of
tests/ledger/oracle.py (every question replays the events from scratch; it shares no code with
ledger.account, the fold under test). The one processor rule it restates: usage of a tenant with no
grant earlier on its partition is dead-lettered ("unknown tenant"), not folded.
"""

from __future__ import annotations

from collections import defaultdict

import msgspec

from ledger.codec import decode_input_event
from ledger.events import RULE_EVENT_TYPES, CreditGranted, UsageRecorded
from streams.records import BalanceRecord
from streams.topics import LedgerTopics
from tests.ledger import oracle
from tests.simulation.chain_check import ChainObserver, PropertyViolated
from tests.simulation.log import SimulatedLog

ALL_TIME_MS = 2**62  # a time after every event of a simulation


def check(condition: bool, message: str) -> None:
    if not condition:
        raise PropertyViolated(message)


class LedgerModel:
    def __init__(self, log: SimulatedLog, topics: LedgerTopics) -> None:
        self.log = log
        self.topics = topics
        self._decoded: dict[int, list] = defaultdict(list)  # partition -> decoded events, by offset

    def applied_events(self, tenant_id: str, partition: int, through_offset: int) -> list:
        """The tenant's events a processor has folded once it applied every record up to `through_offset`."""
        decoded = self._decoded[partition]
        records = self.log.partition_log(self.topics.events, partition)
        for record in records[len(decoded) :]:
            decoded.append(decode_input_event(record.value))
        applied = []
        has_grant = False
        for event in decoded[: through_offset + 1]:
            if event.tenant_id != tenant_id or type(event) in RULE_EVENT_TYPES:
                continue  # rule events: folded beside the account (tests.simulation.alerts_check)
            if isinstance(event, UsageRecorded) and not has_grant:
                continue  # dead-lettered: unknown tenant
            has_grant = has_grant or isinstance(event, CreditGranted)
            applied.append(event)
        return oracle.distinct_events(applied)


class Finance:
    """A consumer of the output topics that keeps one record per entry id and the latest balance."""

    def __init__(
        self, log: SimulatedLog, topics: LedgerTopics, model: LedgerModel, partition_of, chain: ChainObserver
    ) -> None:
        self.chain = chain  # the hash chain over the same records, and the checkpoints
        self.log = log
        self.topics = topics
        self.model = model
        self.partition_of = partition_of
        self.positions: dict[tuple[str, int], int] = defaultdict(int)
        self.entries: dict[str, bytes] = {}
        self.entries_of: dict[str, list[dict]] = defaultdict(list)  # tenant -> first copies, in order
        self.latest_balance: dict[str, BalanceRecord] = {}
        self.balances_checked = 0
        self.unchecked: set[str] = set()  # tenants with records not yet integrated by check_integration

    def consume(self) -> None:
        """Read what was appended since the last call; check each entry id and each balance as it comes."""
        for partition in range(self.log.partitions):
            for record in self._new(self.topics.entries, partition):
                entry = msgspec.json.decode(record.value)
                entry_id = entry.get("entry_id") or entry["event_id"]  # credit_expired names it event_id
                first = self.entries.get(entry_id)
                self.unchecked.add(entry["tenant_id"])
                self.chain.entry(entry["tenant_id"], record.value)
                if first is None:
                    self.entries[entry_id] = record.value
                    self.entries_of[entry["tenant_id"]].append(entry)
                else:
                    check(
                        first == record.value,
                        f"entry id {entry_id} carries two contents:\n  {first!r}\n  {record.value!r}",
                    )
            for record in self._new(self.topics.checkpoints, partition):
                self.chain.checkpoint(record.key.decode(), record.value)
            for record in self._new(self.topics.balances, partition):
                balance = msgspec.json.decode(record.value, type=BalanceRecord)
                self.check_balance(balance)
                self.latest_balance[balance.tenant_id] = balance
                self.unchecked.add(balance.tenant_id)
        self.chain.settle()

    def check_balance(self, record: BalanceRecord) -> None:
        """A published balance equals the brute-force fold, at its as_of, of the events it says it
        includes."""
        
        
        events = self.model.applied_events(
            record.tenant_id, self.partition_of(record.tenant_id), record.applied_offset
        )
        expected = (oracle.balance_at(events, record.as_of), oracle.overage_at(events, ALL_TIME_MS))
        check(
            (record.balance, record.overage) == expected,
            f"balance of {record.tenant_id} at {record.as_of} (through offset {record.applied_offset}): "
            f"published (balance, overage) {(record.balance, record.overage)}, the fold says {expected}",
        )
        self.balances_checked += 1

    def check_balance_now(self, tenant_id: str, swept_ms: int) -> None:
        """After a sweep at `swept_ms`, the tenant's latest balance is true at `swept_ms` (a block that
        became effective or ended since was published)."""
        latest = self.latest_balance.get(tenant_id)
        if latest is None:
            return
        events = self.model.applied_events(tenant_id, self.partition_of(tenant_id), latest.applied_offset)
        check(
            latest.balance == oracle.balance_at(events, swept_ms),
            f"{tenant_id}: after a sweep at {swept_ms} the latest balance is {latest.balance} (as of {latest.as_of}), "  # noqa: E501
            f"the fold at {swept_ms} says {oracle.balance_at(events, swept_ms)}",
        )

    def check_integration(self, tenant_id: str) -> None:
        """The tenant's entries, one per id, integrate exactly to the fold of the events its latest balance
        covers: per grant consumed, forfeited and voided, total overage; corrections reference records
        that exist; conservation per grant."""
        self.unchecked.discard(tenant_id)
        latest = self.latest_balance.get(tenant_id)
        if latest is None:
            check(not self.entries_of.get(tenant_id), f"entries of {tenant_id} without any balance published")
            return
        events = self.model.applied_events(tenant_id, self.partition_of(tenant_id), latest.applied_offset)
        blocks, overage = oracle.replay(events, ALL_TIME_MS)
        consumed: dict[str, int] = defaultdict(int)
        ended: dict[str, dict[str, int]] = {
            "credit_expired": defaultdict(int),
            "credit_voided": defaultdict(int),
        }
        kind_of: dict[str, str] = {}
        usage_ids = set()
        integrated_overage = 0
        for entry in self.entries_of.get(tenant_id, []):
            kind = entry["type"]
            if kind == "usage_allocated":
                usage_ids.add(entry["event_id"])
                check(
                    sum(a for _, a, *_money in entry["allocations"]) + entry["overage"] == entry["amount"],
                    f"{entry['entry_id']}: allocations + overage != amount",
                )
                for grant_id, amount, *_money in entry["allocations"]:
                    consumed[grant_id] += amount
                integrated_overage += entry["overage"]
            elif kind == "allocation_corrected":
                for grant_id, delta, *_money in entry["allocations"]:
                    consumed[grant_id] += delta
                integrated_overage += entry["overage_delta"]
            elif kind in ended:
                entry_id = entry.get("entry_id") or entry["event_id"]
                kind_of[entry_id] = kind
                ended[kind][entry["grant_id"]] += entry["amount"]
            elif kind == "end_corrected":
                corrected = kind_of.get(entry["corrects"])
                check(
                    corrected is not None,
                    f"{entry['entry_id']} corrects {entry['corrects']}, which was never published",
                )
                ended[corrected][entry["grant_id"]] += entry["delta"]
            elif kind != "grant_recorded":  # a grant's terms as the fold accepted them: no movement
                raise PropertyViolated(f"unknown entry type {kind}")
        where = f"tenant {tenant_id} through offset {latest.applied_offset}, stream time {latest.as_of}"
        expected_usage = {e.event_id for e in events if isinstance(e, UsageRecorded)}
        check(
            usage_ids == expected_usage,
            f"{where}: usage entries for {sorted(usage_ids)}, applied {sorted(expected_usage)}",
        )
        check(
            integrated_overage == overage,
            f"{where}: entries integrate to overage {integrated_overage}, the fold says {overage}",
        )
        for block in blocks.values():
            grant_id = block.grant_id
            has_ended = block.end <= latest.as_of
            forfeited = block.amount - block.consumed if has_ended and not block.voided else 0
            voided = block.amount - block.consumed if has_ended and block.voided else 0
            got = (
                consumed.get(grant_id, 0),
                ended["credit_expired"].get(grant_id, 0),
                ended["credit_voided"].get(grant_id, 0),
            )
            check(
                got == (block.consumed, forfeited, voided),
                f"{where}: grant {grant_id} integrates to (consumed, forfeited, voided) {got}, "
                f"the fold says {(block.consumed, forfeited, voided)}",
            )
            check(sum(got) <= block.amount, f"{where}: grant {grant_id} gave out more than its amount")
        unknown = (set(consumed) | set(ended["credit_expired"]) | set(ended["credit_voided"])) - set(blocks)
        check(not unknown, f"{where}: entries for grants the events never granted: {sorted(unknown)}")

    def _new(self, topic: str, partition: int):
        records = self.log.partition_log(topic, partition)
        start = self.positions[(topic, partition)]
        self.positions[(topic, partition)] = len(records)
        return records[start:]
