"""The prompt builder: instructions + history + new input in the model's chat template, within its
context; `truncation: "auto"` drops the oldest history, `"disabled"` answers 400 as OpenAI does; billing
is for the tokens actually sent (the worker's count of the built prompt)."""

from __future__ import annotations

import openai
import pytest

from gateway.errors import ApiError
from gateway.prompt_builder import build_prompt
from inference.settings import WorkerSettings
from tests.gateway.conftest import RecordingAdmission, gateway_settings, insert_tenant_with_key, start_gateway

MODEL = "tollgate-tiny"
SPEC = WorkerSettings().models[MODEL]
CHARS_MAX = 65_536


def turn(index: int) -> list[dict]:
    return [
        {
            "role": "user",
            "content": f"Question number {index}: what happened on day {index} of the long voyage?",
        },
        {"role": "assistant", "content": f"On day {index} the ship sailed further north through grey water."},
    ]


HISTORY = [message for index in range(40) for message in turn(index)]  # far beyond a 512-token context
NEW_INPUT = [{"role": "user", "content": "And on the last day?"}]


def tokens_of(prompt: str) -> int:
    return len(SPEC.tokenizer().encode(prompt))


def test_a_prompt_that_fits_keeps_everything():
    built = build_prompt(SPEC, "Be brief.", HISTORY[:4], NEW_INPUT, 16, "disabled", CHARS_MAX)
    assert built.history_dropped == 0
    assert built.prompt == SPEC.template.render(
        [{"role": "system", "content": "Be brief."}, *HISTORY[:4], *NEW_INPUT]
    )
    assert built.prompt_tokens == tokens_of(built.prompt)
    assert built.max_tokens == 16


def test_truncation_disabled_refuses_a_history_over_the_context():
    with pytest.raises(ApiError) as refused:
        build_prompt(SPEC, "Be brief.", HISTORY, NEW_INPUT, 16, "disabled", CHARS_MAX)
    assert refused.value.status_code == 400
    assert (refused.value.code, refused.value.param) == ("context_length_exceeded", "input")


def test_truncation_auto_drops_the_fewest_oldest_messages():
    built = build_prompt(SPEC, "Be brief.", HISTORY, NEW_INPUT, 16, "auto", CHARS_MAX)
    dropped = built.history_dropped
    assert 0 < dropped < len(HISTORY)
    kept = [{"role": "system", "content": "Be brief."}, *HISTORY[dropped:], *NEW_INPUT]
    assert built.prompt == SPEC.template.render(kept)  # instructions and the new input always kept
    assert built.prompt_tokens + 16 <= SPEC.context_tokens_max
    one_more = SPEC.template.render(
        [{"role": "system", "content": "Be brief."}, *HISTORY[dropped - 1 :], *NEW_INPUT]
    )
    assert tokens_of(one_more) + 16 > SPEC.context_tokens_max  # dropping one fewer would not fit


def test_without_max_output_tokens_the_answer_gets_what_the_context_leaves():
    built = build_prompt(SPEC, None, HISTORY, NEW_INPUT, None, "auto", CHARS_MAX)
    assert built.max_tokens == min(SPEC.context_tokens_max - built.prompt_tokens, SPEC.max_tokens_max)


def test_an_input_too_long_on_its_own_is_refused_even_with_auto():
    huge = [{"role": "user", "content": "word " * 2000}]
    with pytest.raises(ApiError) as refused:
        build_prompt(SPEC, None, HISTORY, huge, 16, "auto", CHARS_MAX)
    assert refused.value.code == "context_length_exceeded"


def test_max_output_tokens_over_the_models_bound_is_refused():
    with pytest.raises(ApiError) as refused:
        build_prompt(SPEC, None, [], NEW_INPUT, SPEC.max_tokens_max + 1, "auto", CHARS_MAX)
    assert refused.value.param == "max_output_tokens"


# ---- through the API -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(worker, module_database_url):
    running = start_gateway(module_database_url, gateway_settings([worker.url]), RecordingAdmission())
    yield running
    running.server.stop()


@pytest.mark.postgres
async def test_a_long_conversation_is_truncated_or_refused_and_billed_for_what_was_sent(
    gateway, worker, module_database_url
):
    tenant = insert_tenant_with_key(module_database_url, "prompt-acme")
    client = openai.AsyncOpenAI(api_key=tenant.key, base_url=gateway.url + "/v1", max_retries=0)
    conversation = await client.conversations.create(items=HISTORY)
    admitted_before = len(gateway.admission.admitted)
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(
            model=MODEL, conversation=conversation.id, input=NEW_INPUT[0]["content"], max_output_tokens=16
        )
    assert refused.value.code == "context_length_exceeded"
    assert len(gateway.admission.admitted) == admitted_before  # refused before admission: nothing billed

    response = await client.responses.create(
        model=MODEL,
        conversation=conversation.id,
        input=NEW_INPUT[0]["content"],
        max_output_tokens=16,
        truncation="auto",
        temperature=0,
    )
    expected = build_prompt(SPEC, None, HISTORY, NEW_INPUT, 16, "auto", CHARS_MAX)
    usage = worker.usage_of(response.id.removeprefix("resp_"))
    assert response.usage.input_tokens == usage.prompt_tokens == expected.prompt_tokens
    assert usage.prompt_tokens + 16 <= SPEC.context_tokens_max
    assert response.truncation == "auto"
    admitted = gateway.admission.admitted[-1]
    assert (admitted.prompt_tokens, admitted.max_tokens) == (expected.prompt_tokens, 16)
