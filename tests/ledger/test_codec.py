from __future__ import annotations

import pytest

from ledger.codec import decode_event, decode_input_event, encode_event
from ledger.entries import Allocation, UsageAllocated, decode_entry, encode_entry
from ledger.events import CreditExpired, CreditGranted, GrantVoided, InvalidEvent, UsageRecorded, validated

EVENTS = [
    CreditGranted(
        event_id="e1", tenant_id="t", grant_id="g", amount=5, effective_at=1, expires_at=9, priority=2
    ),
    CreditGranted(event_id="e2", tenant_id="t", grant_id="g2", amount=5, effective_at=1),
    GrantVoided(event_id="e3", tenant_id="t", grant_id="g", voided_at=4),
    UsageRecorded(
        event_id="r1", tenant_id="t", amount=0, occurred_at=3, model="m", prompt_tokens=1, completion_tokens=2
    ),
    CreditExpired(event_id="t/expired/g", tenant_id="t", grant_id="g", expired_at=9, amount=3),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_round_trip(event):
    assert decode_event(encode_event(event)) == event


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "undecodable"),
        (b"[]", "invalid"),
        (b'{"type":"credit_granted"}', "event_id"),
        (b'{"type":"mystery","event_id":"x"}', "type"),
        (
            b'{"type":"credit_granted","event_id":"e","tenant_id":"t","grant_id":"g","amount":-1,"effective_at":1}',
            "amount",
        ),
        (
            b'{"type":"credit_granted","event_id":"e","tenant_id":"t","grant_id":"g","amount":1,"effective_at":5,"expires_at":5}',
            "expires_at",
        ),
        (
            b'{"type":"credit_granted","event_id":"e","tenant_id":"t","grant_id":"g","amount":1.5,"effective_at":1}',
            "amount",
        ),
        (
            b'{"type":"usage_recorded","event_id":"","tenant_id":"t","amount":1,"occurred_at":1,"model":"m"}',
            "event_id",
        ),
        (
            b'{"type":"usage_recorded","event_id":"r","tenant_id":"t","amount":1,"occurred_at":-3,"model":"m"}',
            "occurred_at",
        ),
    ],
)
def test_bad_records_raise_one_typed_error_that_says_why(raw, reason):
    with pytest.raises(InvalidEvent) as error:
        decode_event(raw)
    assert reason in error.value.reason


def test_derived_events_are_not_input():
    with pytest.raises(InvalidEvent):
        decode_input_event(encode_event(EVENTS[-1]))


def test_events_built_in_code_can_be_validated():
    with pytest.raises(InvalidEvent, match="amount"):
        validated(CreditGranted(event_id="e", tenant_id="t", grant_id="g", amount=0, effective_at=1))


def test_events_are_immutable():
    with pytest.raises(AttributeError):
        EVENTS[0].amount = 10


def test_entry_round_trip():
    entry = UsageAllocated(
        entry_id="t/usage/r",
        tenant_id="t",
        event_id="r",
        occurred_at=1,
        model="m",
        prompt_tokens=1,
        completion_tokens=2,
        amount=5,
        allocations=(Allocation("g", 4),),
        overage=1,
    )
    assert decode_entry(encode_entry(entry)) == entry
