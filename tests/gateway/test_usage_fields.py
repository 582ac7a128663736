"""The usage event's optional prompt_version and trace_id: absent in old events (read as None), validated
like the other identifiers when present, carried by the fold to the usage entry."""

from __future__ import annotations

import msgspec
import pytest

from ledger.account import Account
from ledger.codec import decode_event, encode_event
from ledger.events import CreditGranted, UsageRecorded
from ledger.usage_index import InMemoryUsageIndex

OLD_EVENT = (
    b'{"type":"usage_recorded","event_id":"req-1","tenant_id":"acme","amount":5,"occurred_at":1000,'
    b'"model":"tollgate-tiny","prompt_tokens":3,"completion_tokens":1,"schema_version":2}'
)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_an_event_written_before_the_fields_reads_as_none():
    event = decode_event(OLD_EVENT)
    assert isinstance(event, UsageRecorded)
    assert (event.prompt_version, event.trace_id) == (None, None)


def test_the_fields_round_trip():
    event = msgspec.structs.replace(decode_event(OLD_EVENT), prompt_version="support@3", trace_id=TRACE_ID)
    assert decode_event(encode_event(event)) == event


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt_version", ""),
        ("prompt_version", "x" * 129),
        ("trace_id", "XYZ"),
        ("trace_id", TRACE_ID.upper()),
    ],
)
def test_a_bad_value_is_refused(field, value):
    bad = OLD_EVENT.replace(b',"schema_version"', f',"{field}":"{value}","schema_version"'.encode())
    with pytest.raises(Exception, match=field):
        decode_event(bad)


def test_the_usage_entry_carries_the_prompt_version():
    account = Account("acme")
    index = InMemoryUsageIndex()
    account.apply(
        CreditGranted(event_id="g-1", tenant_id="acme", grant_id="g-1", amount=100, effective_at=0), index
    )
    usage = msgspec.structs.replace(decode_event(OLD_EVENT), prompt_version="support@3", trace_id=TRACE_ID)
    entries = account.apply(usage, index)
    assert [entry.prompt_version for entry in entries if type(entry).__name__ == "UsageAllocated"] == [
        "support@3"
    ]


def test_an_untraced_request_sends_no_trace_context_and_no_prompt_version():
    from opentelemetry import trace

    from gateway.tracing import traceparent_of
    from gateway.workers import GenerateCall

    call = GenerateCall("r", "acme", "standard", "m", "hi", 4, (), 1.0, 1.0, None)
    assert b"traceparent" not in call.encode("r-1") and b"prompt_version" not in call.encode("r-1")
    assert traceparent_of(trace.INVALID_SPAN) is None
    traced = GenerateCall(
        "r", "acme", "standard", "m", "hi", 4, (), 1.0, 1.0, None, prompt_version="p@1", traceparent="00-x"
    )
    assert b'"traceparent":"00-x"' in traced.encode("r-1") and b'"prompt_version":"p@1"' in traced.encode(
        "r-1"
    )
