"""The Responses and Conversations APIs through the official `openai` client, over a real worker and real
Postgres (admission recorded): a multi-turn conversation, continuation from a previous response,
streaming events, deletion, retention expiry, and one tenant never reaching another's."""

from __future__ import annotations

import time

import httpx
import msgspec
import openai
import psycopg
import pytest

from gateway.conversations import DAY_MS, ConversationStore
from inference.settings import WorkerSettings
from ledger.pricing import usage_amount
from storage.database import DatabaseSettings, build_async_engine, build_session_factory
from tests.gateway.conftest import (
    ADMIN_TOKEN,
    RecordingAdmission,
    gateway_settings,
    insert_tenant_with_key,
    start_gateway,
)

pytestmark = pytest.mark.postgres

MODEL = "tollgate-tiny"
SPEC = WorkerSettings().models[MODEL]


@pytest.fixture(scope="module")
def gateway(worker, module_database_url):
    running = start_gateway(module_database_url, gateway_settings([worker.url]), RecordingAdmission())
    yield running
    running.server.stop()


@pytest.fixture(scope="module")
def tenant(module_database_url):
    return insert_tenant_with_key(module_database_url, "responses-acme")


@pytest.fixture(scope="module")
def other_tenant(module_database_url):
    return insert_tenant_with_key(module_database_url, "responses-other")


@pytest.fixture
def client(gateway, tenant) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=tenant.key, base_url=gateway.url + "/v1", max_retries=0)


@pytest.fixture
def other_client(gateway, other_tenant) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=other_tenant.key, base_url=gateway.url + "/v1", max_retries=0)


def prompt_tokens_of(messages: list[dict]) -> int:
    """What the model's worker counts for these messages in its chat template."""
    return len(SPEC.tokenizer().encode(SPEC.template.render(messages)))


def count_rows(database_url: str, table: str, column: str, value: str) -> int:
    with psycopg.connect(database_url) as connection:
        return connection.execute(f"SELECT count(*) FROM {table} WHERE {column} = %s", (value,)).fetchone()[0]


def request_id_of(response) -> str:
    return response.id.removeprefix("resp_")


async def test_a_response_is_billed_for_the_tokens_the_worker_counted(client, gateway, worker, tenant):
    response = await client.responses.create(
        model=MODEL, input="Hello there", max_output_tokens=8, temperature=0
    )
    assert response.object == "response"
    assert response.status in ("completed", "incomplete")
    assert response.output[0].role == "assistant"
    usage = worker.usage_of(request_id_of(response))
    assert (response.usage.input_tokens, response.usage.output_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert usage.prompt_tokens == prompt_tokens_of([{"role": "user", "content": "Hello there"}])
    assert (request_id_of(response), usage.amount) in gateway.admission.finished
    assert usage.amount == usage_amount(SPEC.price, usage.prompt_tokens, usage.completion_tokens)
    # The ledger's event names ids and counts only: the text is kept by the conversation store alone.
    fields = msgspec.structs.asdict(usage)
    text_fields = {name for name, value in fields.items() if isinstance(value, str)}
    assert text_fields == {"event_id", "tenant_id", "model", "api_key_id"}
    assert fields["api_key_id"] == tenant.key_id
    assert (fields["event_id"], fields["tenant_id"], fields["model"]) == (
        request_id_of(response),
        tenant.tenant_id,
        MODEL,
    )


async def test_continuation_from_a_previous_response_sends_its_history(client, worker):
    first = await client.responses.create(
        model=MODEL, input="Tell me a story", instructions="Be brief.", max_output_tokens=6, temperature=0
    )
    second = await client.responses.create(
        model=MODEL, previous_response_id=first.id, input="And then?", max_output_tokens=6, temperature=0
    )
    assert second.previous_response_id == first.id
    # The previous response's input and output come before the new input; its instructions do not.
    expected = prompt_tokens_of(
        [
            {"role": "user", "content": "Tell me a story"},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "And then?"},
        ]
    )
    assert second.usage.input_tokens == expected == worker.usage_of(request_id_of(second)).prompt_tokens
    fetched = await client.responses.retrieve(second.id)
    assert fetched.id == second.id and fetched.output_text == second.output_text
    items = await client.responses.input_items.list(second.id)
    assert [item.content[0].text for item in items.data] == ["And then?"]


async def test_a_multi_turn_conversation_keeps_its_items_in_order(client, worker):
    conversation = await client.conversations.create(
        metadata={"topic": "weather"}, items=[{"role": "system", "content": "You answer in one line."}]
    )
    assert conversation.object == "conversation" and conversation.metadata == {"topic": "weather"}
    first = await client.responses.create(
        model=MODEL, conversation=conversation.id, input="Is it raining?", max_output_tokens=5, temperature=0
    )
    second = await client.responses.create(
        model=MODEL, conversation=conversation.id, input="And tomorrow?", max_output_tokens=5, temperature=0
    )
    items = await client.conversations.items.list(conversation.id, order="asc")
    assert [(item.role, item.content[0].text) for item in items.data] == [
        ("system", "You answer in one line."),
        ("user", "Is it raining?"),
        ("assistant", first.output_text),
        ("user", "And tomorrow?"),
        ("assistant", second.output_text),
    ]
    assert second.usage.input_tokens == prompt_tokens_of(
        [{"role": item.role, "content": item.content[0].text} for item in items.data[:4]]
    )
    assert worker.usage_of(request_id_of(second)).prompt_tokens == second.usage.input_tokens
    await client.conversations.items.create(conversation.id, items=[{"role": "user", "content": "Thanks"}])
    newest = await client.conversations.items.list(conversation.id, limit=1)
    assert newest.data[0].content[0].text == "Thanks" and newest.has_more


async def test_a_streamed_response_sends_the_typed_events_and_is_stored(client, worker):
    stream = await client.responses.create(
        model=MODEL, input="Count to three", max_output_tokens=12, temperature=0, stream=True
    )
    events = [event async for event in stream]
    types = [event.type for event in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text == events[-4].text
    usage = worker.usage_of(request_id_of(final))
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    stored = await client.responses.retrieve(final.id)
    assert stored.output_text == text


async def test_deleting_a_response_removes_its_row(client, module_database_url):
    response = await client.responses.create(model=MODEL, input="Forget me", max_output_tokens=3)
    assert count_rows(module_database_url, "stored_responses", "response_id", response.id) == 1
    await client.responses.delete(response.id)
    assert count_rows(module_database_url, "stored_responses", "response_id", response.id) == 0
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model=MODEL, previous_response_id=response.id, input="Still there?")


async def test_a_response_not_stored_cannot_be_continued(client):
    response = await client.responses.create(model=MODEL, input="Ephemeral", max_output_tokens=3, store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)


async def test_a_conversation_keeps_the_turns_of_responses_not_stored(client, module_database_url):
    conversation = await client.conversations.create()
    response = await client.responses.create(
        model=MODEL, conversation=conversation.id, input="Remember me", max_output_tokens=3, store=False
    )
    items = await client.conversations.items.list(conversation.id, order="asc")
    assert [item.role for item in items.data] == ["user", "assistant"]
    assert items.data[1].content[0].text == response.output_text
    assert count_rows(module_database_url, "stored_responses", "response_id", response.id) == 0


async def test_deleting_a_conversation_removes_its_items(client, module_database_url):
    conversation = await client.conversations.create(items=[{"role": "user", "content": "one"}])
    await client.responses.create(model=MODEL, conversation=conversation.id, input="two", max_output_tokens=3)
    assert count_rows(module_database_url, "conversation_items", "conversation_id", conversation.id) == 3
    deleted = await client.conversations.delete(conversation.id)
    assert deleted.deleted
    assert count_rows(module_database_url, "conversation_items", "conversation_id", conversation.id) == 0
    assert count_rows(module_database_url, "conversations", "conversation_id", conversation.id) == 0
    with pytest.raises(openai.NotFoundError):
        await client.conversations.retrieve(conversation.id)


async def test_one_tenant_never_reaches_another_tenants_text(client, other_client, module_database_url):
    conversation = await client.conversations.create(items=[{"role": "user", "content": "private"}])
    response = await client.responses.create(model=MODEL, input="private too", max_output_tokens=3)
    attempts = [
        other_client.responses.retrieve(response.id),
        other_client.responses.delete(response.id),
        other_client.responses.input_items.list(response.id),
        other_client.responses.create(model=MODEL, previous_response_id=response.id, input="hi"),
        other_client.conversations.retrieve(conversation.id),
        other_client.conversations.update(conversation.id, metadata={"x": "y"}),
        other_client.conversations.delete(conversation.id),
        other_client.conversations.items.list(conversation.id),
        other_client.conversations.items.create(conversation.id, items=[{"role": "user", "content": "x"}]),
        other_client.responses.create(model=MODEL, conversation=conversation.id, input="hi"),
    ]
    for attempt in attempts:
        with pytest.raises(openai.NotFoundError):
            await attempt
    assert (await client.responses.retrieve(response.id)).id == response.id
    items = await client.conversations.items.list(conversation.id)
    assert [item.content[0].text for item in items.data] == ["private"]


async def test_the_retention_sweep_deletes_expired_text_for_real(
    gateway, client, tenant, module_database_url
):
    async with httpx.AsyncClient(
        base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as admin:
        put = await admin.put(f"/admin/v1/tenants/{tenant.tenant_id}/policy", json={"retention_days": 1})
        assert put.status_code == 200, put.text
    conversation = await client.conversations.create(items=[{"role": "user", "content": "short-lived"}])
    response = await client.responses.create(model=MODEL, input="short-lived too", max_output_tokens=3)
    keeper = insert_tenant_with_key(module_database_url, "responses-keeper")  # no policy: kept for ever
    keeper_client = openai.AsyncOpenAI(api_key=keeper.key, base_url=gateway.url + "/v1", max_retries=0)
    kept = await keeper_client.responses.create(model=MODEL, input="kept", max_output_tokens=3)

    engine = build_async_engine(
        module_database_url,
        DatabaseSettings(database_url=module_database_url, pool_size_max=1, pool_overflow_max=0),
    )
    store = ConversationStore(build_session_factory(engine), policy_cache_ttl_ms=0)
    now_ms = time.time_ns() // 1_000_000
    try:
        assert await store.sweep(now_ms + DAY_MS // 2, batch_max=1000) == (0, 0)  # within the day: kept
        assert count_rows(module_database_url, "stored_responses", "response_id", response.id) == 1
        deleted_conversations, deleted_responses = await store.sweep(now_ms + 2 * DAY_MS, batch_max=1000)
    finally:
        await engine.dispose()
    assert deleted_conversations >= 1 and deleted_responses >= 1
    for table, column, value in (
        ("conversations", "conversation_id", conversation.id),
        ("conversation_items", "conversation_id", conversation.id),
        ("stored_responses", "response_id", response.id),
        ("stored_responses", "tenant_id", tenant.tenant_id),
    ):
        assert count_rows(module_database_url, table, column, value) == 0, table
    assert count_rows(module_database_url, "stored_responses", "response_id", kept.id) == 1
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)
    async with httpx.AsyncClient(
        base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as admin:
        await admin.put(f"/admin/v1/tenants/{tenant.tenant_id}/policy", json={"retention_days": None})


async def test_text_postgres_cannot_hold_is_refused_with_a_400(client):
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(model=MODEL, input="a\x00b", max_output_tokens=3)
    assert refused.value.code == "invalid_value"
    with pytest.raises(openai.BadRequestError):
        await client.conversations.create(metadata={"k": "v\x00"})
