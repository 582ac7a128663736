"""Cached prompt tokens, end to end through the official `openai` client: the gateway, a real worker with
its prefix cache, Kafka, the processor, the projector and Postgres (tests/fixtures/stack.py), serving a
registry whose model prices a cached prompt token below a prompt token.

Two requests share a long system prompt: the second reports `usage.prompt_tokens_details.cached_tokens`
> 0 (non-streaming body and streaming usage chunk alike), and its usage entry carries those cached tokens
and costs them at the cached price; the ledger_entries projection shows them in its own column.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import openai
import psycopg
import pytest

from ledger.pricing import Price, usage_amount
from tests.fixtures.registry import default_entry, write_registry

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

MODEL = "tollgate-tiny"
PRICE = Price(prompt_token_credits=4, completion_token_credits=8, cached_prompt_token_credits=1)
SYSTEM = (
    "You are the support assistant of a software company. Answer in one short paragraph, quote the "
    "license text where it applies, never invent a clause, and say when you do not know. "
) * 4


@pytest.fixture(scope="module")
def cached_price_registry(tmp_path_factory) -> Iterator[None]:
    """Every process of this module's stack reads this registry (they inherit the environment)."""
    path = write_registry(
        tmp_path_factory.mktemp("registry"),
        [
            default_entry(
                price={
                    "prompt_token_credits": PRICE.prompt_token_credits,
                    "completion_token_credits": PRICE.completion_token_credits,
                    "cached_prompt_token_credits": PRICE.cached_prompt_token_credits,
                }
            )
        ],
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TOLLGATE_MODEL_REGISTRY_PATH", str(path))
        yield


@pytest.fixture(scope="module")
def cached_stack(cached_price_registry, stack):
    return stack


def client_of(stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=stack.gateway_url + "/v1", max_retries=0, timeout=60)


def messages(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def projected_cached_tokens(database_url: str, entry_id: str) -> int | None:
    with psycopg.connect(database_url) as connection:
        row = connection.execute(
            "SELECT cached_prompt_tokens FROM ledger_entries WHERE entry_id = %s", (entry_id,)
        ).fetchone()
    assert row is not None, f"entry {entry_id} is not projected"
    return row[0]


def assert_billed_with_cache(stack, database_url, tenant_id, request_id, usage, before) -> int:
    cached = usage.prompt_tokens_details.cached_tokens
    entry = stack.usage_entry(tenant_id, request_id)
    cost = usage_amount(PRICE, usage.prompt_tokens, usage.completion_tokens, cached)
    assert (
        entry["prompt_tokens"],
        entry["completion_tokens"],
        entry["cached_prompt_tokens"],
        entry["amount"],
    ) == (usage.prompt_tokens, usage.completion_tokens, cached, cost)
    assert projected_cached_tokens(database_url, entry["entry_id"]) == cached
    stack.wait_balance(tenant_id, before - cost)
    return cost


def test_a_shared_prefix_is_served_from_cache_reported_and_billed_at_the_cached_price(
    cached_stack, module_database_url
):
    stack = cached_stack
    tenant = stack.demo
    client = client_of(stack, tenant.key)
    assert os.environ["TOLLGATE_MODEL_REGISTRY_PATH"]

    before = stack.balance(tenant.tenant_id)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages("What does the license allow?"), max_tokens=8, temperature=0
    )
    first = raw.parse()
    assert first.usage.prompt_tokens > 200 and first.usage.prompt_tokens_details.cached_tokens == 0
    before -= assert_billed_with_cache(
        stack, module_database_url, tenant.tenant_id, raw.headers["x-request-id"], first.usage, before
    )

    # The same system prompt again, streamed: the final usage chunk reports the cached tokens.
    raw_stream = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=messages("May I sell copies?"),
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(raw_stream.parse())
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    cached = usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < usage.prompt_tokens and cached % 16 == 0  # whole blocks of the shared prefix
    cost = assert_billed_with_cache(
        stack, module_database_url, tenant.tenant_id, raw_stream.headers["x-request-id"], usage, before
    )
    assert cost < usage_amount(PRICE, usage.prompt_tokens, usage.completion_tokens)  # the discount
    before -= cost

    # And non-streaming: the response body's usage carries them too.
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages("Who wrote it?"), max_tokens=8, temperature=0
    )
    third = raw.parse()
    assert third.usage.prompt_tokens_details.cached_tokens > 0
    assert_billed_with_cache(
        stack, module_database_url, tenant.tenant_id, raw.headers["x-request-id"], third.usage, before
    )
