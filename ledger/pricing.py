"""Pricing: token counts -> an amount in integer credit units. The one place a price is computed: the
gateway's admission estimate, the gateway's settle (usage a worker could not record) and the worker's
UsageRecorded all call `usage_amount` with the model's `Price` from the model registry.

    amount = (prompt_tokens - cached_prompt_tokens) * prompt_token_credits
           + cached_prompt_tokens * cached_prompt_token_credits
           + completion_tokens * completion_token_credits

Cached prompt tokens are the part of the prompt served from a prefix cache; they are a subset of the
prompt tokens, priced at their own rate. Integers only; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Price:
    """Integer credit units per token processed, for one model."""

    prompt_token_credits: int
    completion_token_credits: int
    cached_prompt_token_credits: int = 0

    def __post_init__(self) -> None:
        # A price comes from configuration (the model registry): a bad one is an operating error, said
        # as a ValueError naming the field, not an assertion.
        for name in ("prompt_token_credits", "completion_token_credits", "cached_prompt_token_credits"):
            value = getattr(self, name)
            if type(value) is not int:
                raise ValueError(f"{name} must be an integer number of credit units, not {value!r}")
            if value < 0:
                raise ValueError(f"{name} must not be negative, not {value}")


def usage_amount(
    price: Price, prompt_tokens: int, completion_tokens: int, cached_prompt_tokens: int = 0
) -> int:
    """The credit units of the tokens processed (see the module docstring)."""
    assert prompt_tokens >= 0, "prompt token counts are never negative"
    assert completion_tokens >= 0, "completion token counts are never negative"
    assert cached_prompt_tokens >= 0, "cached prompt token counts are never negative"
    assert cached_prompt_tokens <= prompt_tokens, "cached prompt tokens are a part of the prompt tokens"
    amount = (
        (prompt_tokens - cached_prompt_tokens) * price.prompt_token_credits
        + cached_prompt_tokens * price.cached_prompt_token_credits
        + completion_tokens * price.completion_token_credits
    )
    assert type(amount) is int, "an amount is an integer number of credit units"
    assert amount >= 0, "an amount is never negative"
    return amount
