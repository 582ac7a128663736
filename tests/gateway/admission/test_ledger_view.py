"""The balance view fed by hand: newest balance wins, usage offsets, readiness, staleness and lag."""

from __future__ import annotations

from streams.log import LogRecord
from tests.gateway.admission.helpers import (
    PARTITIONS,
    START_MS,
    TOPICS,
    balance_record,
    new_view,
    partition_of,
    usage_record,
)


def folded_reports(view) -> list[tuple[str, str, int]]:
    reports: list[tuple[str, str, int]] = []
    view.add_listener(
        lambda tenant_id, request_id, balance: reports.append((tenant_id, request_id, balance.applied_offset))
    )
    return reports


def test_the_newest_balance_wins_and_an_expiry_at_the_same_offset_replaces_it():
    view = new_view()
    view.apply_balance_records([balance_record("acme", 500, applied_offset=10)])
    view.apply_balance_records([balance_record("acme", 900, applied_offset=8)])  # a reprocessed older batch
    assert view.balance("acme").balance == 500
    view.apply_balance_records([balance_record("acme", 300, applied_offset=10, as_of=START_MS + 60_000)])
    assert view.balance("acme").balance == 300


def test_a_tombstone_forgets_the_tenant():
    view = new_view()
    view.apply_balance_records([balance_record("acme", 500, applied_offset=1)])
    view.apply_balance_records(
        [LogRecord(TOPICS.balances, partition_of("acme"), 99, b"acme", None, START_MS)]
    )
    assert view.balance("acme") is None


def test_spendable_leaves_out_blocks_expired_by_now():
    view = new_view()
    expiring = ((START_MS + 10, 100), (START_MS + 20, 200))
    view.apply_balance_records([balance_record("acme", 1_000, 1, expiring=expiring)])
    balance = view.balance("acme")
    assert [balance.spendable_at(START_MS + dt) for dt in (0, 10, 19, 20)] == [1_000, 900, 900, 700]


def test_a_resent_usage_keeps_its_first_offset():
    view = new_view()
    reports = folded_reports(view)
    view.watch("acme", "r1")
    view.apply_event_records(
        [usage_record("acme", "r1", 10, offset=5), usage_record("acme", "r1", 10, offset=8)]
    )
    view.apply_balance_records([balance_record("acme", 990, applied_offset=5)])
    assert reports == [("acme", "r1", 5)]


def test_only_watched_usage_of_the_right_tenant_is_reported():
    view = new_view()
    reports = folded_reports(view)
    view.watch("acme", "r1")
    wrong_key = usage_record("globex", "r1", 10, offset=3)
    wrong_key = LogRecord(
        wrong_key.topic, wrong_key.partition, wrong_key.offset, b"acme", wrong_key.value, START_MS
    )
    garbage = LogRecord(TOPICS.events, partition_of("acme"), 4, b"acme", b"{not json", START_MS)
    view.apply_event_records([wrong_key, garbage, usage_record("acme", "other", 10, offset=5)])
    view.apply_balance_records([balance_record("acme", 990, applied_offset=5)])
    assert reports == []
    view.unwatch("acme", "r1")
    assert view.watched_count() == 0


def test_ready_once_the_balances_present_at_start_are_read_and_staleness_after():
    view = new_view()
    p = partition_of("acme")
    ends = dict.fromkeys(range(PARTITIONS), 0) | {p: 2}
    view.note_end_offsets(START_MS, ends, dict.fromkeys(range(PARTITIONS), 0))
    assert not view.ready.is_set() and view.staleness_ms(START_MS) is None
    view.apply_balance_records([balance_record("acme", 1, 0, offset=0)])
    assert not view.ready.is_set()
    view.apply_balance_records([balance_record("acme", 2, 1, offset=1)])
    assert view.ready.is_set()
    assert view.staleness_ms(START_MS + 700) == 700
    view.note_end_offsets(START_MS + 1_000, ends | {p: 3}, dict.fromkeys(range(PARTITIONS), 0))
    assert view.staleness_ms(START_MS + 1_500) == 1_500  # one record behind the newer end
    view.apply_balance_records([balance_record("acme", 3, 2, offset=2)])
    assert view.staleness_ms(START_MS + 1_500) == 500


def test_lag_counts_unread_balances_and_events_not_yet_in_a_balance():
    view = new_view()
    p = partition_of("acme")
    view.apply_balance_records([balance_record("acme", 1, applied_offset=6, offset=0)])
    view.note_end_offsets(
        START_MS, dict.fromkeys(range(PARTITIONS), 0) | {p: 4}, dict.fromkeys(range(PARTITIONS), 0) | {p: 10}
    )
    lag = view.metrics.view_lag_records
    assert lag.labels(topic=TOPICS.balances)._value.get() == 3
    assert lag.labels(topic=TOPICS.events)._value.get() == 3  # offsets 7, 8, 9
