"""Pure pieces of the gateway: the circuit breaker, the SSE chunk writer, request preparation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.completion_choice import Logprobs as CompletionLogprobs

from gateway.breaker import CircuitBreaker
from gateway.errors import ApiError
from gateway.schemas import ChatCompletionBody, CompletionBody, parse_body, prepare
from gateway.settings import GatewaySettings
from gateway.wire import (
    DONE_LINE,
    LOGPROB_FLOOR,
    ChunkWriter,
    chat_completion,
    chat_logprobs,
    legacy_logprobs,
    text_completion,
)
from gateway.workers import LogprobEntry, TokenEvent
from inference.chat import CHAT_STOP
from inference.registry import ModelSpec
from inference.tokenizer import count_tokens
from ledger.pricing import Price
from tests.fixtures.registry import default_entry, write_registry


class ManualClock:
    def __init__(self) -> None:
        self.now_ms = 0.0

    def __call__(self) -> float:
        return self.now_ms


def test_breaker_opens_after_consecutive_failures_and_lets_one_trial_through():
    clock = ManualClock()
    breaker = CircuitBreaker(failures_max=2, open_ms=1_000, clock_ms=clock)
    breaker.record_failure()
    breaker.record_success()  # a success in between resets the count
    breaker.record_failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.now_ms = 1_000
    assert breaker.state == "half_open"
    assert breaker.allow() and not breaker.allow()  # one trial at a time
    breaker.record_failure()
    assert breaker.state == "open"  # the trial failed: open again, for a full period
    clock.now_ms = 2_000
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


def test_overloaded_is_neutral_for_the_breaker():
    clock = ManualClock()
    breaker = CircuitBreaker(failures_max=1, open_ms=10, clock_ms=clock)
    for _ in range(5):
        assert breaker.allow()
        breaker.record_neutral()
    assert breaker.state == "closed"


def data_of(line: bytes) -> dict:
    assert line.startswith(b"data: ") and line.endswith(b"\n\n")
    return json.loads(line[6:])


def test_chat_chunks_in_openai_order_with_usage():
    writer = ChunkWriter(chat=True, response_id="chatcmpl-1", created_s=7, model="m", include_usage=True)
    role, token, finish, usage = (
        writer.role(),
        writer.token('he said "hi"\n'),
        writer.finish("length"),
        writer.usage(3, 2),
    )
    assert data_of(role)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    token_chunk = data_of(token)
    assert token_chunk["choices"][0]["delta"] == {"content": 'he said "hi"\n'}
    assert token_chunk["object"] == "chat.completion.chunk" and token_chunk["usage"] is None
    assert token_chunk["id"] == "chatcmpl-1" and token_chunk["created"] == 7
    assert data_of(finish)["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert data_of(usage)["choices"] == []
    assert data_of(usage)["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert DONE_LINE == b"data: [DONE]\n\n"


def test_text_chunks_without_usage_have_no_usage_field():
    writer = ChunkWriter(chat=False, response_id="cmpl-1", created_s=7, model="m", include_usage=False)
    chunk = data_of(writer.token("x"))
    assert chunk["object"] == "text_completion" and chunk["choices"][0]["text"] == "x"
    assert "usage" not in chunk and "usage" not in data_of(writer.finish("stop"))
    with pytest.raises(AssertionError):
        writer.usage(1, 1)


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> GatewaySettings:
    """The default model with a 64-token context, from a registry file."""
    directory = tmp_path_factory.mktemp("registry")
    path = write_registry(directory, [default_entry(context_tokens_max=64, max_tokens_max=32)])
    return GatewaySettings(model_registry_path=path)


def test_prepare_chat_counts_the_rendered_prompt_and_adds_the_turn_stop(settings):
    body = parse_body(
        ChatCompletionBody,
        b'{"model": "tollgate-tiny", "messages": [{"role": "user", "content": "hi"}], "stop": "x"}',
    )
    prepared = prepare(body, settings)
    assert prepared.chat and prepared.stop == ("x", CHAT_STOP)
    assert prepared.prompt_tokens == count_tokens(prepared.prompt)
    assert prepared.max_tokens == min(32, 64 - prepared.prompt_tokens)  # default: what fits


def test_prepare_refuses_what_does_not_fit_naming_the_param(settings):
    long_prompt = json.dumps({"model": "tollgate-tiny", "prompt": "word " * 40, "max_tokens": 30}).encode()
    with pytest.raises(ApiError) as refused:
        prepare(parse_body(CompletionBody, long_prompt), settings)
    assert refused.value.param == "max_tokens" and refused.value.code == "context_length_exceeded"
    with pytest.raises(ApiError) as batched:
        prepare(parse_body(CompletionBody, b'{"model": "tollgate-tiny", "prompt": ["a", "b"]}'), settings)
    assert batched.value.param == "prompt"
    with pytest.raises(ApiError) as n_choices:
        parse_body(CompletionBody, b'{"model": "tollgate-tiny", "prompt": "a", "n": 2}')
    assert n_choices.value.param == "n" and n_choices.value.status_code == 400


def test_max_tokens_max_must_leave_room_for_a_prompt():
    with pytest.raises(ValueError, match="max_tokens_max"):
        ModelSpec(
            name="m", checkpoint_dir=Path("."), context_tokens_max=16, max_tokens_max=16, price=Price(1, 2)
        )


def test_json_log_lines_carry_the_request_tenant_and_model():
    import logging

    from gateway.logs import JsonFormatter, model_var, request_id_var, tenant_id_var

    tokens = [request_id_var.set("req-1"), tenant_id_var.set("acme"), model_var.set("tollgate-tiny")]
    try:
        record = logging.LogRecord("gateway.test", logging.INFO, __file__, 1, "finished %s", ("ok",), None)
        record.cost = 12
        line = json.loads(JsonFormatter().format(record))
    finally:
        for variable, token in zip((request_id_var, tenant_id_var, model_var), tokens, strict=True):
            variable.reset(token)
    assert line["message"] == "finished ok" and line["level"] == "INFO"
    assert (line["request_id"], line["tenant_id"], line["model"], line["cost"]) == (
        "req-1",
        "acme",
        "tollgate-tiny",
        12,
    )


CHAT = {"model": "tollgate-tiny", "messages": [{"role": "user", "content": "hi"}]}
TEXT = {"model": "tollgate-tiny", "prompt": "hi"}


def prepared_of(model, fields: dict):
    return prepare(parse_body(model, json.dumps(fields).encode()), GatewaySettings())


@pytest.mark.parametrize(
    ("model", "fields", "param"),
    [
        (ChatCompletionBody, {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        (ChatCompletionBody, {**CHAT, "functions": [{"name": "f"}]}, "functions"),
        (ChatCompletionBody, {**CHAT, "tool_choice": "auto"}, "tool_choice"),
        (
            ChatCompletionBody,
            {**CHAT, "tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tool_choice",
        ),
        (ChatCompletionBody, {**CHAT, "function_call": "auto"}, "function_call"),
        (ChatCompletionBody, {**CHAT, "response_format": {"type": "json_object"}}, "response_format"),
        (ChatCompletionBody, {**CHAT, "modalities": ["text", "audio"]}, "modalities"),
        (ChatCompletionBody, {**CHAT, "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        (ChatCompletionBody, {**CHAT, "prediction": {"type": "content", "content": "x"}}, "prediction"),
        (ChatCompletionBody, {**CHAT, "top_logprobs": 3}, "top_logprobs"),
        (ChatCompletionBody, {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (ChatCompletionBody, {**CHAT, "n": 2}, "n"),
        (ChatCompletionBody, {**CHAT, "seed": 2**64}, "seed"),
        (ChatCompletionBody, {**CHAT, "seed": -(2**63) - 1}, "seed"),
        (ChatCompletionBody, {**CHAT, "presence_penalty": 2.5}, "presence_penalty"),
        (ChatCompletionBody, {**CHAT, "frequency_penalty": -3}, "frequency_penalty"),
        (ChatCompletionBody, {**CHAT, "logit_bias": {"abc": 1}}, "logit_bias"),
        (ChatCompletionBody, {**CHAT, "logit_bias": {"-5": 1}}, "logit_bias"),
        (ChatCompletionBody, {**CHAT, "logit_bias": {"17": 101}}, "logit_bias"),
        (ChatCompletionBody, {**CHAT, "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        (CompletionBody, {**TEXT, "best_of": 2}, "best_of"),
        (CompletionBody, {**TEXT, "suffix": "and then"}, "suffix"),
        (CompletionBody, {**TEXT, "echo": True}, "echo"),
        (CompletionBody, {**TEXT, "logprobs": 6}, "logprobs"),
    ],
)
def test_what_is_not_served_is_a_400_naming_the_param(model, fields, param):
    with pytest.raises(ApiError) as refused:
        prepared_of(model, fields)
    assert refused.value.status_code == 400 and refused.value.param == param


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (
            ChatCompletionBody,
            {**CHAT, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}},
        ),
        (
            ChatCompletionBody,
            {**CHAT, "modalities": ["text"], "user": "u-1", "store": False, "metadata": {"a": "b"}},
        ),
        (CompletionBody, {**TEXT, "best_of": 1, "suffix": "", "seed": 2**64 - 1}),
        (CompletionBody, {**TEXT, "seed": -(2**63)}),
    ],
)
def test_values_that_ask_for_nothing_unsupported_are_accepted(model, fields):
    prepared_of(model, fields)


def test_served_sampling_parameters_reach_the_prepared_request():
    chat = prepared_of(
        ChatCompletionBody,
        {
            **CHAT,
            "logprobs": True,
            "top_logprobs": 4,
            "logit_bias": {"17": -100, "42": 5.5},
            "presence_penalty": 0.5,
            "frequency_penalty": -1.5,
        },
    )
    assert (chat.logprobs, chat.top_logprobs) == (True, 4)
    assert chat.logit_bias == {17: -100.0, 42: 5.5}
    assert (chat.presence_penalty, chat.frequency_penalty) == (0.5, -1.5)
    text = prepared_of(CompletionBody, {**TEXT, "logprobs": 0})
    assert (text.logprobs, text.top_logprobs, text.logit_bias) == (True, 0, None)
    plain = prepared_of(CompletionBody, TEXT)
    assert (plain.logprobs, plain.top_logprobs, plain.presence_penalty) == (False, 0, 0.0)


def token_event(
    text: str, token_id: int, logprob: float, alternatives: list[tuple[str, float]]
) -> TokenEvent:
    def entry(token: str, value: float) -> LogprobEntry:
        return LogprobEntry(token_id=token_id, token=token, bytes=list(token.encode()), logprob=value)

    return TokenEvent(
        text, token_id, entry(text, logprob), [entry(token, value) for token, value in alternatives]
    )


EVENTS = [
    token_event(" Hel", 1, -0.25, [(" Hel", -0.25), (" Hi", -1.5)]),
    token_event("lo", 2, float("-inf"), []),
]


def test_chat_logprobs_in_openai_shape_parse_with_the_openai_types():
    completion = ChatCompletion.model_validate(
        chat_completion("chatcmpl-1", 7, "m", " Hello", "stop", 3, 2, chat_logprobs(EVENTS))
    )
    content = completion.choices[0].logprobs.content
    assert [item.token for item in content] == [" Hel", "lo"]
    assert content[0].logprob == -0.25 and content[0].bytes == list(b" Hel")
    assert [(top.token, top.logprob) for top in content[0].top_logprobs] == [(" Hel", -0.25), (" Hi", -1.5)]
    assert content[1].logprob == LOGPROB_FLOOR, "log 0 is reported as OpenAI does, not as -inf"
    writer = ChunkWriter(chat=True, response_id="chatcmpl-1", created_s=7, model="m", include_usage=True)
    chunk = ChatCompletionChunk.model_validate(data_of(writer.token_with_logprobs(EVENTS[0])))
    assert chunk.choices[0].delta.content == " Hel" and chunk.usage is None
    assert chunk.choices[0].logprobs.content[0].top_logprobs[1].token == " Hi"


def test_completion_logprobs_in_the_legacy_shape_parse_with_the_openai_types():
    completion = Completion.model_validate(
        text_completion("cmpl-1", 7, "m", " Hello", "stop", 3, 2, legacy_logprobs(EVENTS, 0))
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == [" Hel", "lo"]
    assert logprobs.token_logprobs == [-0.25, LOGPROB_FLOOR]
    assert logprobs.top_logprobs == [{" Hel": -0.25, " Hi": -1.5}, {}]
    assert logprobs.text_offset == [0, 4]
    writer = ChunkWriter(chat=False, response_id="cmpl-1", created_s=7, model="m", include_usage=False)
    choices = [data_of(writer.token_with_logprobs(event))["choices"][0] for event in EVENTS]
    chunk_logprobs = [CompletionLogprobs.model_validate(choice["logprobs"]) for choice in choices]
    assert [item.text_offset for item in chunk_logprobs] == [[0], [4]], "offsets run on across chunks"
    assert [item.tokens for item in chunk_logprobs] == [[" Hel"], ["lo"]]
    assert choices[1]["text"] == "lo" and choices[1]["finish_reason"] is None
