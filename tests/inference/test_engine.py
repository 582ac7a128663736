"""Engine behaviour end to end on the default model: batching invariance, limits, stops, cancellation, sampling."""

from __future__ import annotations

import pytest
import torch

from inference.engine import Engine, GenerationRequest
from inference.request import FinishReason, InvalidRequest, Overloaded
from tests.inference.conftest import (
    completion_text,
    completion_token_ids,
    engine_settings,
    run_to_completion,
)

PROMPTS = [
    "The",
    "Permission is hereby granted, free of charge, to any person obtaining a copy",
    "The \"for\" statement is used to iterate over the elements of a sequence (such as a string, tuple or list)",
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
    batched = run_to_completion(make_engine(device, dtype, step_tokens_max=24, prefill_chunk_tokens_max=8), arrivals)
    for request in requests:
        alone = run_to_completion(make_engine(device, dtype, step_tokens_max=256, prefill_chunk_tokens_max=256), {0: [request]})
        assert completion_token_ids(batched[request.request_id]) == completion_token_ids(alone[request.request_id]), request.prompt
        assert completion_text(batched[request.request_id]) == completion_text(alone[request.request_id])


def cpu_engine(default_models, tokenizer) -> Engine:
    return Engine(default_models("cpu", torch.float32), tokenizer, engine_settings())


def test_greedy_matches_the_plain_forward_pass(default_models, tokenizer):
    prompt = PROMPTS[1]
    outputs = run_to_completion(cpu_engine(default_models, tokenizer), {0: [greedy(0, prompt, max_tokens=12)]})["r0"]
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
    outputs = run_to_completion(cpu_engine(default_models, tokenizer), {0: [greedy(0, "Permission is hereby granted, free of", max_tokens=40)]})
    text = completion_text(outputs["r0"])
    words = [word.strip(".,;:()\"'").lower() for word in text.split()]
    english = {"the", "of", "to", "and", "a", "any", "or", "is", "this", "in", "software", "be", "that", "for"}
    assert sum(word in english for word in words) >= 3, text


def test_max_tokens_ends_with_length(make_engine):
    outputs = run_to_completion(make_engine(), {0: [GenerationRequest(request_id="r", prompt="The", max_tokens=5)]})["r"]
    final = outputs[-1]
    if final.finish_reason is FinishReason.LENGTH:
        assert final.completion_tokens == 5 == len(completion_token_ids(outputs))
    else:  # the model chose end-of-text first
        assert final.finish_reason is FinishReason.STOP and final.completion_tokens < 5
    assert sum(output.finished for output in outputs) == 1


def test_stop_sequence_ends_the_text_before_it(make_engine):
    prompt = PROMPTS[1]
    free_text = completion_text(run_to_completion(make_engine(), {0: [greedy(0, prompt, max_tokens=40)]})["r0"])
    assert len(free_text) > 12, free_text
    stop = free_text[6:10]  # a stop sequence the greedy text is known to contain
    expected_text = free_text[: free_text.find(stop)]
    request = GenerationRequest(request_id="s", prompt=prompt, max_tokens=40, stop=("never-appears", stop))
    outputs = run_to_completion(make_engine(), {0: [request]})["s"]
    assert completion_text(outputs) == expected_text
    assert outputs[-1].finish_reason is FinishReason.STOP
    assert outputs[-1].completion_tokens == len(completion_token_ids(outputs)) < 40


def test_cancel_frees_the_slot_within_one_step(make_engine, tokenizer):
    engine = make_engine(running_sequences_max=1)
    engine.add_request(greedy(0, "The", max_tokens=200))
    engine.add_request(greedy(1, "A class", max_tokens=3))
    engine.step()
    engine.step()
    assert engine.queue_depth() == (1, 1) and engine.cache.free_slot_count == 0
    engine.abort_request("r0")
    outputs = engine.step()
    cancelled = [output for output in outputs if output.request_id == "r0"]
    assert len(cancelled) == 1 and cancelled[0].finish_reason is FinishReason.CANCELLED
    assert cancelled[0].completion_tokens == 2 and cancelled[0].prompt_tokens == len(tokenizer.encode("The"))
    # The same step admitted the waiting request into the freed slot.
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
    assert [(o.finish_reason, o.prompt_tokens, o.completion_tokens) for o in outputs] == [(FinishReason.CANCELLED, 0, 0)]


def test_cancel_mid_prefill_counts_only_the_prompt_tokens_processed(make_engine, tokenizer):
    engine = make_engine(step_tokens_max=8, prefill_chunk_tokens_max=8)
    engine.add_request(greedy(0, PROMPTS[6], max_tokens=5))
    assert len(tokenizer.encode(PROMPTS[6])) > 16
    engine.step()
    engine.step()
    engine.abort_request("r0")
    [output] = engine.step()
    assert (output.finish_reason, output.prompt_tokens, output.completion_tokens) == (FinishReason.CANCELLED, 16, 0)


def test_seeded_sampling_replays_and_differs_from_greedy(make_engine):
    def sampled(request_id: str, seed: int) -> GenerationRequest:
        return GenerationRequest(request_id=request_id, prompt="The", max_tokens=30, temperature=1.0, top_p=0.9, seed=seed)

    alone = run_to_completion(make_engine(), {0: [sampled("a", seed=11)]})["a"]
    in_batch = run_to_completion(make_engine(), {0: [greedy(0, PROMPTS[1]), sampled("a", seed=11), sampled("b", seed=12)]})
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
    with pytest.raises(Overloaded):
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
    outputs = run_to_completion(engine, {0: [greedy(i, prompt, max_tokens=16) for i, prompt in enumerate(PROMPTS)]})
    assert all(outputs[f"r{i}"][-1].finished for i in range(len(PROMPTS)))
    assert engine.cache.keys.dtype == torch.float16 and engine.cache.keys.is_cuda
