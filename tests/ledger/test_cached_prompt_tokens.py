"""Cached prompt tokens on UsageRecorded: optional (old events read as 0), never more than the prompt, and
carried onto the usage entry the fold books; the amount is the event's, priced by ledger.pricing."""

from __future__ import annotations

import json

import pytest

from ledger.codec import decode_input_event, encode_event
from ledger.entries import UsageAllocated
from ledger.events import CreditGranted, InvalidEvent, UsageRecorded
from ledger.pricing import Price, usage_amount
from ledger.tenant import TenantLedger

PRICE = Price(prompt_token_credits=4, completion_token_credits=8, cached_prompt_token_credits=1)


def usage(cached: int, prompt: int = 300, completion: int = 5) -> UsageRecorded:
    return UsageRecorded(
        event_id="req-1",
        tenant_id="t",
        amount=usage_amount(PRICE, prompt, completion, cached),
        occurred_at=10,
        model="m",
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_prompt_tokens=cached,
    )


def test_an_event_written_before_cached_tokens_existed_reads_as_none_cached():
    old = {
        "type": "usage_recorded",
        "event_id": "old",
        "tenant_id": "t",
        "amount": 7,
        "occurred_at": 1,
        "model": "m",
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "schema_version": 1,
    }
    event = decode_input_event(json.dumps(old).encode())
    assert isinstance(event, UsageRecorded) and event.cached_prompt_tokens == 0


def test_cached_tokens_round_trip_and_may_equal_but_not_exceed_the_prompt():
    event = usage(cached=300)
    assert decode_input_event(encode_event(event)) == event
    with pytest.raises(InvalidEvent, match="cached_prompt_tokens"):
        UsageRecorded(
            event_id="e",
            tenant_id="t",
            amount=1,
            occurred_at=1,
            model="m",
            prompt_tokens=3,
            cached_prompt_tokens=4,
        )
    raw = json.loads(encode_event(usage(cached=10)))
    raw["cached_prompt_tokens"] = 301
    with pytest.raises(InvalidEvent, match="cached_prompt_tokens"):
        decode_input_event(json.dumps(raw).encode())


def test_the_usage_entry_carries_the_cached_tokens_and_the_cached_price_amount():
    ledger = TenantLedger("t")
    ledger.apply(CreditGranted(event_id="g", tenant_id="t", grant_id="g", amount=10_000, effective_at=0))
    [entry] = [e for e in ledger.apply(usage(cached=192)) if isinstance(e, UsageAllocated)]
    assert (entry.prompt_tokens, entry.cached_prompt_tokens, entry.completion_tokens) == (300, 192, 5)
    # 108 uncached at 4, 192 cached at 1, 5 completion at 8: less than the 300 * 4 + 40 uncached price.
    assert entry.amount == 108 * 4 + 192 * 1 + 5 * 8 == 664 < usage_amount(PRICE, 300, 5)
