"""The UsageRecorded event of one finished request: tokens actually processed, priced in credit units by
`ledger.pricing` (the same function the gateway estimates and settles with)."""

from __future__ import annotations

import time

from ledger.events import UsageRecorded
from ledger.pricing import Price, usage_amount


def build_usage_event(
    request_id: str,
    tenant_id: str,
    model: str,
    price: Price,
    prompt_tokens: int,
    completion_tokens: int,
    cached_prompt_tokens: int = 0,
    occurred_at_ms: int | None = None,
    api_key_id: str | None = None,
) -> UsageRecorded:
    """event_id is the worker request id (the gateway's attempt id), so a replayed emit, or the gateway's own
    event for a stream whose worker died, is a duplicate the ledger ignores. occurred_at is when the request
    was admitted when the caller knows it (so credit that expires during generation still covers it), else
    now. cached_prompt_tokens (of prompt_tokens, those the prefix cache served) are billed at the model's
    cached prompt price. api_key_id: the key (its id) the request was made with, which per-key budgets
    count usage by."""
    amount = usage_amount(price, prompt_tokens, completion_tokens, cached_prompt_tokens)
    assert amount >= 0, "a usage amount is never negative"
    return UsageRecorded(
        event_id=request_id,
        tenant_id=tenant_id,
        amount=amount,
        occurred_at=occurred_at_ms if occurred_at_ms is not None else time.time_ns() // 1_000_000,
        model=model,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cached_prompt_tokens=cached_prompt_tokens,
        api_key_id=api_key_id,
    )
