"""Engine behaviour end to end on the default model: batching invariance, limits, stops, cancellation,
sampling,
failure isolation, logprobs, logit_bias and penalties."""

from __future__ import annotations

import math

import pytest
import torch

from inference import sampler
from inference.detokenizer import IncrementalDetokenizer
from inference.engine import Engine, GenerationRequest
from inference.request import (
    LOGIT_BIAS_ENTRIES_MAX,
    SEED_MAX,
    SEED_MIN,
    TEMPERATURE_MAX,
    TOP_LOGPROBS_MAX,
    FinishReason,
    InvalidRequest,
    WaitingQueueFull,
)
from tests.inference.conftest import (
    completion_text,
    completion_token_ids,
    engine_settings,
    run_to_completion,
)

PROMPTS = [
    "The",
    "Permission is hereby granted, free of charge, to any person obtaining a copy",
    'The "for" statement is used to iterate over the elements of a sequence (such as a string, tuple or list)',  # noqa: E501
    "GNU GENERAL PUBLIC LICENSE\n",
    "A class definition defines a class object",
    "x",
    "This program is free software; you can redistribute it and/or modify it under the terms of the GNU "
    "General Public License as published by the Free Software Foundation; either version 2 of the License",
    "Exceptions",
]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    """Engine tests run on the CPU and, where present, on CUDA."""
    return request.param


@pytest.fixture()
def make_engine(default_models, tokenizer, device):
    def make(on_device: str | None = None, dtype: torch.dtype = torch.float32, **overrides) -> Engine:
        chosen = on_device or device
        return Engine(default_models(chosen, dtype), tokenizer, engine_settings(device=chosen, **overrides))

    return make


def greedy(index: int, prompt: str, max_tokens: int = 24) -> GenerationRequest:
    return GenerationRequest(request_id=f"r{index}", prompt=prompt, max_tokens=max_tokens)


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cpu", torch.float32),
        ("cpu", torch.float64),
        # On CUDA the GEMM kernel (and so the float32 rounding) changes with the batch shape, which can
        # flip a near-tie argmax; in float64 the rounding is far below any logit gap.
        pytest.param("cuda", torch.float64, marks=pytest.mark.cuda),
    ],
)
def test_batched_greedy_equals_each_prompt_decoded_alone(make_engine, device, dtype):
    requests = [greedy(i, prompt) for i, prompt in enumerate(PROMPTS)]
    # Staggered arrivals, a small budget and chunk so long prompts prefill in pieces next to decodes.
    arrivals = {0: requests[:3], 2: requests[3:5], 5: requests[5:7], 9: requests[7:]}
    batched = run_to_completion(
        make_engine(device, dtype, step_tokens_max=24, prefill_chunk_tokens_max=8), arrivals
    )
    for request in requests:
        alone = run_to_completion(
            make_engine(device, dtype, step_tokens_max=256, prefill_chunk_tokens_max=256), {0: [request]}
        )
        assert completion_token_ids(batched[request.request_id]) == completion_token_ids(
            alone[request.request_id]
        ), request.prompt
        assert completion_text(batched[request.request_id]) == completion_text(alone[request.request_id])


def cpu_engine(default_models, tokenizer) -> Engine:
    return Engine(default_models("cpu", torch.float32), tokenizer, engine_settings())


def test_greedy_matches_the_plain_forward_pass(default_models, tokenizer):
    prompt = PROMPTS[1]
    outputs = run_to_completion(
        cpu_engine(default_models, tokenizer), {0: [greedy(0, prompt, max_tokens=12)]}
    )["r0"]
    model = default_models("cpu", torch.float32)
    token_ids = tokenizer.encode(prompt)
    expected = []
    with torch.inference_mode():
        for _ in range(12):
            next_token = int(model(torch.tensor([token_ids]))[0, -1].argmax())
            if next_token == model.config.eos_token_id:
                break
            expected.append(next_token)
            token_ids.append(next_token)
    assert completion_token_ids(outputs)[: len(expected)] == expected


def test_default_model_writes_recognisable_text(default_models, tokenizer):
    outputs = run_to_completion(
        cpu_engine(default_models, tokenizer),
        {0: [greedy(0, "Permission is hereby granted, free of", max_tokens=40)]},
    )
    text = completion_text(outputs["r0"])
    words = [word.strip(".,;:()\"'").lower() for word in text.split()]
    english = {
        "the",
        "of",
        "to",
        "and",
        "a",
        "any",
        "or",
        "is",
        "this",
        "in",
        "software",
        "be",
        "that",
        "for",
    }
    assert sum(word in english for word in words) >= 3, text


def test_max_tokens_ends_with_length(make_engine):
    outputs = run_to_completion(
        make_engine(), {0: [GenerationRequest(request_id="r", prompt="The", max_tokens=5)]}
    )["r"]
    final = outputs[-1]
    if final.finish_reason is FinishReason.LENGTH:
        assert final.completion_tokens == 5 == len(completion_token_ids(outputs))
    else:  # the model chose end-of-text first
        assert final.finish_reason is FinishReason.STOP and final.completion_tokens < 5
    assert sum(output.finished for output in outputs) == 1


def test_stop_sequence_ends_the_text_before_it(make_engine):
    prompt = PROMPTS[1]
    free_text = completion_text(
        run_to_completion(make_engine(), {0: [greedy(0, prompt, max_tokens=40)]})["r0"]
    )
    assert len(free_text) > 12, free_text
    stop = free_text[6:10]  # a stop sequence the greedy text is known to contain
    expected_text = free_text[: free_text.find(stop)]
    request = GenerationRequest(request_id="s", prompt=prompt, max_tokens=40, stop=("never-appears", stop))
    outputs = run_to_completion(make_engine(), {0: [request]})["s"]
    assert completion_text(outputs) == expected_text
    assert outputs[-1].finish_reason is FinishReason.STOP
    assert outputs[-1].completion_tokens == len(completion_token_ids(outputs)) < 40


def test_cancel_frees_the_blocks_within_one_step(make_engine, tokenizer):
    engine = make_engine(running_sequences_max=1)
    engine.add_request(greedy(0, "The", max_tokens=200))
    engine.add_request(greedy(1, "A class", max_tokens=3))
    engine.step()
    engine.step()
    assert engine.queue_depth() == (1, 1) and engine.scheduler.kv.holds_blocks("r0")
    engine.abort_request("r0")
    outputs = engine.step()
    cancelled = [output for output in outputs if output.request_id == "r0"]
    assert len(cancelled) == 1 and cancelled[0].finish_reason is FinishReason.CANCELLED
    assert cancelled[0].completion_tokens == 2 and cancelled[0].prompt_tokens == len(tokenizer.encode("The"))
    # The same step admitted the waiting request into the freed place.
    assert any(output.request_id == "r1" for output in outputs)
    assert engine.queue_depth() == (0, 1)
    engine.abort_request("r0")  # a second cancel of a finished request changes nothing
    rest = run_to_completion(engine, {})
    assert "r0" not in rest and rest["r1"][-1].finished


def test_cancel_while_waiting_reports_nothing_processed(make_engine):
    engine = make_engine(running_sequences_max=1)
    engine.add_request(greedy(0, "The", max_tokens=50))
    engine.add_request(greedy(1, "A class definition", max_tokens=50))
    engine.step()
    engine.abort_request("r1")
    outputs = [output for output in engine.step() if output.request_id == "r1"]
    assert [(o.finish_reason, o.prompt_tokens, o.completion_tokens) for o in outputs] == [
        (FinishReason.CANCELLED, 0, 0)
    ]


def test_cancel_mid_prefill_counts_only_the_prompt_tokens_processed(make_engine, tokenizer):
    engine = make_engine(step_tokens_max=8, prefill_chunk_tokens_max=8)
    engine.add_request(greedy(0, PROMPTS[6], max_tokens=5))
    assert len(tokenizer.encode(PROMPTS[6])) > 16
    engine.step()
    engine.step()
    engine.abort_request("r0")
    [output] = engine.step()
    assert (output.finish_reason, output.prompt_tokens, output.completion_tokens) == (
        FinishReason.CANCELLED,
        16,
        0,
    )


def test_seeded_sampling_replays_and_differs_from_greedy(make_engine):
    def sampled(request_id: str, seed: int) -> GenerationRequest:
        return GenerationRequest(
            request_id=request_id, prompt="The", max_tokens=30, temperature=1.0, top_p=0.9, seed=seed
        )

    alone = run_to_completion(make_engine(), {0: [sampled("a", seed=11)]})["a"]
    in_batch = run_to_completion(
        make_engine(), {0: [greedy(0, PROMPTS[1]), sampled("a", seed=11), sampled("b", seed=12)]}
    )
    assert completion_token_ids(alone) == completion_token_ids(in_batch["a"])
    assert completion_token_ids(in_batch["a"]) != completion_token_ids(in_batch["b"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10_000}, "exceeds the context"),
        ({"prompt": ""}, "empty"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"tier": "platinum"}, "tier"),
        ({"stop": ("a", "b", "c", "d", "e")}, "stop"),
        ({"prompt": None, "prompt_token_ids": [1, 99_999]}, "prompt_token_ids"),
    ],
)
def test_bad_requests_are_refused_with_the_field_named(make_engine, overrides, message):
    values = {"request_id": "bad", "prompt": "The", "max_tokens": 4} | overrides
    engine = make_engine()
    with pytest.raises(InvalidRequest, match=message):
        engine.add_request(GenerationRequest(**values))
    assert not engine.has_unfinished_requests()


def test_full_queue_answers_overloaded(make_engine):
    engine = make_engine(running_sequences_max=1, waiting_queue_depth_max=2)
    for index in range(2):
        engine.add_request(greedy(index, "The"))
    with pytest.raises(WaitingQueueFull):
        engine.add_request(greedy(9, "The"))


def test_higher_tier_is_admitted_first_and_low_tier_still_finishes(make_engine):
    engine = make_engine(running_sequences_max=1)
    engine.add_request(GenerationRequest(request_id="free", prompt="The", max_tokens=2, tier="free"))
    engine.add_request(GenerationRequest(request_id="ent", prompt="The", max_tokens=2, tier="enterprise"))
    order = []
    for output in (o for _ in range(20) for o in engine.step()):
        if output.finished:
            order.append(output.request_id)
    assert order == ["ent", "free"]


@pytest.mark.cuda
def test_cuda_half_precision_generates(default_models, tokenizer):
    engine = Engine(default_models("cuda", torch.float16), tokenizer, engine_settings(device="cuda"))
    outputs = run_to_completion(
        engine, {0: [greedy(i, prompt, max_tokens=16) for i, prompt in enumerate(PROMPTS)]}
    )
    assert all(outputs[f"r{i}"][-1].finished for i in range(len(PROMPTS)))
    assert engine.cache.keys.dtype == torch.float16 and engine.cache.keys.is_cuda


# ---- one request cannot hurt another (issue #11) -------------------------------------------------


def test_a_seed_outside_the_64_bit_range_is_refused_before_scheduling(make_engine):
    engine = make_engine()
    for seed in (2**64, SEED_MAX + 1, SEED_MIN - 1, -(2**70)):
        with pytest.raises(InvalidRequest, match="seed"):
            engine.add_request(
                GenerationRequest(request_id="s", prompt="The", max_tokens=4, temperature=1.0, seed=seed)
            )
        assert engine.scheduler.requests == {} and len(engine.scheduler.waiting) == 0
        assert engine._generators == {} and engine._detokenizers == {}
    engine.add_request(
        GenerationRequest(request_id="s", prompt="The", max_tokens=4, temperature=1.0, seed=SEED_MAX)
    )
    engine.add_request(
        GenerationRequest(request_id="t", prompt="The", max_tokens=4, temperature=1.0, seed=SEED_MIN)
    )
    outputs = run_to_completion(engine, {})
    assert outputs["s"][-1].finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert outputs["t"][-1].finish_reason in (FinishReason.LENGTH, FinishReason.STOP)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seed": 2**64}, "seed"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": 2.0000001}, "temperature"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_p": 1.0000001}, "top_p"),
        ({"top_p": -0.0}, "top_p"),
        ({"max_tokens": 2**70}, "exceeds the context"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"top_logprobs": 1}, "top_logprobs"),  # without logprobs
        ({"logprobs": True, "top_logprobs": TOP_LOGPROBS_MAX + 1}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"logit_bias": {99_999: 1.0}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {5: math.nan}}, "logit_bias"),
        ({"logit_bias": {i: 1.0 for i in range(LOGIT_BIAS_ENTRIES_MAX + 1)}}, "logit_bias"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -math.inf}, "frequency_penalty"),
        ({"stop": ("ok", 7)}, "stop"),
    ],
)
def test_out_of_range_sampling_parameters_are_refused_and_leave_nothing_behind(
    make_engine, overrides, message
):
    values = {"request_id": "bad", "prompt": "The", "max_tokens": 4} | overrides
    engine = make_engine()
    with pytest.raises(InvalidRequest, match=message):
        engine.add_request(GenerationRequest(**values))
    assert engine.scheduler.requests == {} and engine._generators == {} and engine._detokenizers == {}


@pytest.mark.parametrize(
    ("temperature", "top_p"),
    [
        (1e-38, 1.0),
        (1e-46, 1.0),
        (5e-324, 1.0),
        (1.0, 1e-46),
        (1.0, 1e-38),
        (TEMPERATURE_MAX, 5e-324),
        (1e-38, 1e-46),
    ],
)
def test_tiny_accepted_temperature_and_top_p_generate_normally(make_engine, temperature, top_p):
    """The values from the issue that killed the engine thread for every tenant."""
    request = GenerationRequest(
        request_id="x", prompt="The", max_tokens=8, temperature=temperature, top_p=top_p, seed=3
    )
    outputs = run_to_completion(make_engine(), {0: [request, greedy(1, "The", max_tokens=8)]})
    assert outputs["x"][-1].finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    # Both collapse to the most likely token: the same text as greedy.
    assert completion_token_ids(outputs["x"]) == completion_token_ids(outputs["r1"])


def other_requests() -> list[GenerationRequest]:
    return [
        greedy(0, PROMPTS[1], max_tokens=12),
        GenerationRequest(request_id="sampled", prompt="The", max_tokens=12, temperature=0.8, seed=5),
        GenerationRequest(
            request_id="logprobs", prompt="A class", max_tokens=12, logprobs=True, top_logprobs=2
        ),
    ]


def tokens_of(outputs) -> dict[str, list[int]]:
    return {
        request_id: completion_token_ids(outputs[request_id]) for request_id in ("r0", "sampled", "logprobs")
    }


def doomed() -> GenerationRequest:
    return GenerationRequest(request_id="doomed", prompt="The", max_tokens=12, temperature=1.0, seed=666)


def assert_serves_afterwards(engine: Engine) -> None:
    after = run_to_completion(engine, {0: [greedy(7, "The", max_tokens=3), doomed()]})
    assert after["r7"][-1].finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert engine.scheduler.kv.usage() == 0.0 and not engine.scheduler.requests


def test_a_failure_choosing_one_requests_token_fails_that_request_only(make_engine, monkeypatch):
    baseline = tokens_of(run_to_completion(make_engine(), {0: other_requests()}))
    real_sample_row = sampler.sample_row
    calls = {"doomed": 0}

    def sample_row_failing_for_seed_666(logits, param, generator, output_token_ids):
        if param.seed == 666:
            calls["doomed"] += 1
            if calls["doomed"] == 3:  # after two tokens, mid-batch
                raise RuntimeError("injected sampling failure")
        return real_sample_row(logits, param, generator, output_token_ids)

    monkeypatch.setattr(sampler, "sample_row", sample_row_failing_for_seed_666)
    engine = make_engine()
    outputs = run_to_completion(engine, {0: [*other_requests(), doomed()]})
    final = outputs["doomed"][-1]
    assert final.finish_reason is FinishReason.ERROR and "injected sampling failure" in final.error
    assert final.completion_tokens == 2 == len(completion_token_ids(outputs["doomed"]))
    assert final.prompt_tokens == len(engine.tokenizer.encode("The"))
    assert sum(output.finished for output in outputs["doomed"]) == 1
    assert tokens_of(outputs) == baseline  # the others went on exactly as without it
    assert all(outputs[request_id][-1].error is None for request_id in baseline)
    calls["doomed"] = -100  # the same seed now succeeds: the engine serves new requests
    assert_serves_afterwards(engine)


def test_a_failure_building_one_requests_output_fails_that_request_only(make_engine, monkeypatch):
    baseline = tokens_of(run_to_completion(make_engine(), {0: other_requests()}))
    engine = make_engine()
    real_push = IncrementalDetokenizer.push

    def push_failing_for_doomed(detokenizer, token_id):
        if detokenizer is engine._detokenizers.get("doomed"):
            raise UnicodeError("injected detokenizer failure")
        return real_push(detokenizer, token_id)

    monkeypatch.setattr(IncrementalDetokenizer, "push", push_failing_for_doomed)
    outputs = run_to_completion(engine, {0: [*other_requests(), doomed()]})
    [final] = outputs["doomed"]
    assert final.finish_reason is FinishReason.ERROR and "injected detokenizer failure" in final.error
    assert final.completion_tokens == 1 and final.token_id is None
    assert tokens_of(outputs) == baseline
    monkeypatch.setattr(IncrementalDetokenizer, "push", real_push)
    assert_serves_afterwards(engine)


def test_a_failed_forward_pass_fails_that_steps_requests_and_the_engine_goes_on(make_engine, monkeypatch):
    engine = make_engine(running_sequences_max=2)
    engine.add_request(greedy(0, "The", max_tokens=6))
    engine.add_request(greedy(1, "A class", max_tokens=6))
    engine.add_request(greedy(2, "Exceptions", max_tokens=6))  # waits: only two run
    engine.step()
    real_forward = engine.model.forward_packed
    monkeypatch.setattr(
        engine.model, "forward_packed", lambda *args: (_ for _ in ()).throw(RuntimeError("injected"))
    )
    outputs = engine.step()
    assert sorted(output.request_id for output in outputs) == ["r0", "r1"]
    assert all(
        output.finish_reason is FinishReason.ERROR and "injected" in output.error for output in outputs
    )
    assert [output.completion_tokens for output in outputs] == [1, 1]
    monkeypatch.setattr(engine.model, "forward_packed", real_forward)
    rest = run_to_completion(engine, {})
    assert rest["r2"][-1].finish_reason in (FinishReason.LENGTH, FinishReason.STOP) and set(rest) == {"r2"}
    assert_serves_afterwards(engine)


# ---- OpenAI's logprobs, logit_bias and penalties ------------------------------------------------------


def test_logit_bias_forces_a_token_and_bans_another_under_greedy(make_engine, tokenizer):
    free = completion_token_ids(
        run_to_completion(make_engine(), {0: [greedy(0, PROMPTS[1], max_tokens=10)]})["r0"]
    )
    forced_token = tokenizer.encode(" zebra")[0]
    assert forced_token not in free
    forced = GenerationRequest(
        request_id="f", prompt=PROMPTS[1], max_tokens=10, logit_bias={forced_token: 100.0}
    )
    assert completion_token_ids(run_to_completion(make_engine(), {0: [forced]})["f"]) == [forced_token] * 10
    banned = GenerationRequest(request_id="b", prompt=PROMPTS[1], max_tokens=10, logit_bias={free[0]: -100.0})
    banned_ids = completion_token_ids(run_to_completion(make_engine(), {0: [banned]})["b"])
    assert free[0] not in banned_ids and banned_ids != free


@pytest.mark.parametrize("prompt", ["The", "GNU GENERAL PUBLIC LICENSE\n"])
def test_a_frequency_penalty_reduces_repetition(make_engine, prompt):
    def repeats(**penalties) -> int:
        request = GenerationRequest(request_id="p", prompt=prompt, max_tokens=40, **penalties)
        token_ids = completion_token_ids(run_to_completion(make_engine(), {0: [request]})["p"])
        return len(token_ids) - len(set(token_ids))

    assert repeats(frequency_penalty=2.0) < repeats()
    assert repeats(frequency_penalty=2.0, presence_penalty=2.0) < repeats()
    assert repeats(frequency_penalty=-2.0, presence_penalty=-2.0) > repeats()


def test_logprobs_describe_the_chosen_token_and_its_alternatives(make_engine, tokenizer):
    plain = run_to_completion(make_engine(), {0: [greedy(0, PROMPTS[3], max_tokens=12)]})["r0"]
    request = GenerationRequest(
        request_id="l", prompt=PROMPTS[3], max_tokens=12, logprobs=True, top_logprobs=5
    )
    outputs = run_to_completion(make_engine(), {0: [request]})["l"]
    assert completion_token_ids(outputs) == completion_token_ids(plain)  # asking for logprobs changes nothing
    for output in (o for o in outputs if o.token_id is not None):
        chosen, top = output.logprob, output.top_logprobs
        assert chosen.token_id == output.token_id and chosen.logprob <= 0.0
        assert len(top) == 5 and [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert top[0] == chosen  # greedy chose the most likely token
        assert sum(math.exp(t.logprob) for t in top) <= 1.0 + 1e-9
        for token in top:
            assert bytes(token.bytes) == tokenizer.token_bytes(token.token_id)
            assert token.token == bytes(token.bytes).decode("utf-8", errors="replace")
    chosen_bytes = b"".join(
        bytes(o.logprob.bytes) for o in outputs if o.token_id not in (None, tokenizer.eos_token_id)
    )
    assert chosen_bytes.decode("utf-8", errors="replace") == completion_text(
        outputs
    )  # the bytes spell the text
    without = run_to_completion(make_engine(), {0: [greedy(0, "The", max_tokens=3)]})["r0"]
    assert all(o.logprob is None and o.top_logprobs == () for o in without)


def test_logprobs_without_top_logprobs_and_with_sampling(make_engine):
    def sampled(request_id: str, **extra) -> GenerationRequest:
        return GenerationRequest(
            request_id=request_id, prompt="The", max_tokens=10, temperature=1.0, seed=9, **extra
        )

    outputs = run_to_completion(make_engine(), {0: [sampled("plain"), sampled("lp", logprobs=True)]})
    assert completion_token_ids(outputs["lp"]) == completion_token_ids(outputs["plain"])
    tokens = [o for o in outputs["lp"] if o.token_id is not None]
    assert all(o.logprob is not None and o.logprob.logprob <= 0.0 and o.top_logprobs == () for o in tokens)
