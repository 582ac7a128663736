"""The UsageRecorded event of one finished request: tokens actually processed, priced in credit units."""

from __future__ import annotations

import time

from inference.settings import ModelPrice
from ledger.events import UsageRecorded


def usage_amount(price: ModelPrice, prompt_tokens: int, completion_tokens: int) -> int:
    assert prompt_tokens >= 0 and completion_tokens >= 0, "token counts are never negative"
    return prompt_tokens * price.prompt_token_credits + completion_tokens * price.completion_token_credits


def build_usage_event(
    request_id: str,
    tenant_id: str,
    model: str,
    price: ModelPrice,
    prompt_tokens: int,
    completion_tokens: int,
    occurred_at_ms: int | None = None,
) -> UsageRecorded:
    """event_id is the worker request id (the gateway's attempt id), so a replayed emit, or the gateway's own
    event for a stream whose worker died, is a duplicate the ledger ignores. occurred_at is when the request
    was admitted when the caller knows it (so credit that expires during generation still covers it), else now."""
    return UsageRecorded(
        event_id=request_id,
        tenant_id=tenant_id,
        amount=usage_amount(price, prompt_tokens, completion_tokens),
        occurred_at=occurred_at_ms if occurred_at_ms is not None else time.time_ns() // 1_000_000,
        model=model,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )
