"""Pure pieces of the gateway: the circuit breaker, the SSE chunk writer, request preparation."""

from __future__ import annotations

import json

import pytest

from gateway.breaker import CircuitBreaker
from gateway.errors import ApiError
from gateway.schemas import ChatCompletionBody, CompletionBody, parse_body, prepare
from gateway.settings import GatewaySettings, ModelLimits
from gateway.wire import DONE_LINE, ChunkWriter
from inference.chat import CHAT_STOP
from inference.tokenizer import count_tokens


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
    role, token, finish, usage = writer.role(), writer.token('he said "hi"\n'), writer.finish("length"), writer.usage(3, 2)
    assert data_of(role)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    token_chunk = data_of(token)
    assert token_chunk["choices"][0]["delta"] == {"content": 'he said "hi"\n'}
    assert token_chunk["object"] == "chat.completion.chunk" and token_chunk["usage"] is None
    assert token_chunk["id"] == "chatcmpl-1" and token_chunk["created"] == 7
    assert data_of(finish)["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert data_of(usage)["choices"] == []
    assert data_of(usage)["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert DONE_LINE == b"data: [DONE]\n\n"


def test_text_chunks_without_usage_have_no_usage_field():
    writer = ChunkWriter(chat=False, response_id="cmpl-1", created_s=7, model="m", include_usage=False)
    chunk = data_of(writer.token("x"))
    assert chunk["object"] == "text_completion" and chunk["choices"][0]["text"] == "x"
    assert "usage" not in chunk and "usage" not in data_of(writer.finish("stop"))
    with pytest.raises(AssertionError):
        writer.usage(1, 1)


SETTINGS = GatewaySettings(models={"tollgate-tiny": ModelLimits(context_tokens_max=64, max_tokens_max=32)})


def test_prepare_chat_counts_the_rendered_prompt_and_adds_the_turn_stop():
    body = parse_body(ChatCompletionBody, b'{"model": "tollgate-tiny", "messages": [{"role": "user", "content": "hi"}], "stop": "x"}')
    prepared = prepare(body, SETTINGS)
    assert prepared.chat and prepared.stop == ("x", CHAT_STOP)
    assert prepared.prompt_tokens == count_tokens(prepared.prompt)
    assert prepared.max_tokens == min(32, 64 - prepared.prompt_tokens)  # default: what fits


def test_prepare_refuses_what_does_not_fit_naming_the_param():
    long_prompt = json.dumps({"model": "tollgate-tiny", "prompt": "word " * 40, "max_tokens": 30}).encode()
    with pytest.raises(ApiError) as refused:
        prepare(parse_body(CompletionBody, long_prompt), SETTINGS)
    assert refused.value.param == "max_tokens" and refused.value.code == "context_length_exceeded"
    with pytest.raises(ApiError) as batched:
        prepare(parse_body(CompletionBody, b'{"model": "tollgate-tiny", "prompt": ["a", "b"]}'), SETTINGS)
    assert batched.value.param == "prompt"
    with pytest.raises(ApiError) as n_choices:
        parse_body(CompletionBody, b'{"model": "tollgate-tiny", "prompt": "a", "n": 2}')
    assert n_choices.value.param == "n" and n_choices.value.status_code == 400


def test_max_tokens_max_must_leave_room_for_a_prompt():
    with pytest.raises(ValueError, match="max_tokens_max"):
        ModelLimits(context_tokens_max=16, max_tokens_max=16)


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
    assert (line["request_id"], line["tenant_id"], line["model"], line["cost"]) == ("req-1", "acme", "tollgate-tiny", 12)
