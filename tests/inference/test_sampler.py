"""The sampler on hand-made logits: safe at every accepted value, top_p and temperature as documented,
logit_bias and penalties by OpenAI's formula, logprobs of the adjusted distribution."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.request import (
    LOGIT_BIAS_MAX,
    PENALTY_MAX,
    SEED_MAX,
    SEED_MIN,
    TEMPERATURE_GREEDY_BELOW,
    TEMPERATURE_MAX,
    SamplingParams,
)
from inference.sampler import (
    LOGPROB_MIN,
    RowFailure,
    SampledToken,
    SamplingError,
    new_generator,
    sample_next_tokens,
    sample_row,
)

VOCAB = 64
FLOAT32_MAX = torch.finfo(torch.float32).max
FLOAT64_MAX = torch.finfo(torch.float64).max


def random_logits(seed: int = 0, scale: float = 4.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, generator=generator, dtype=torch.float64) * scale


def draw(
    logits: torch.Tensor, seed: int = 0, output_token_ids: list[int] | None = None, **params
) -> SampledToken:
    param = SamplingParams(max_tokens=1, **params)
    generator = None if param.greedy else new_generator(seed)
    return sample_row(logits.to(torch.float64), param, generator, output_token_ids or [])


# Accepted values the issue found fatal (1e-38, 1e-46), the threshold's neighbours, and the bounds.
EXTREME_TEMPERATURES = [
    0.0,
    5e-324,
    1e-46,
    1e-38,
    TEMPERATURE_GREEDY_BELOW * 0.999,
    TEMPERATURE_GREEDY_BELOW,
    1e-3,
    1.0,
    TEMPERATURE_MAX,
]
EXTREME_TOP_PS = [5e-324, 1e-46, 1e-38, 1e-6, 0.5, 1.0 - 1e-16, 1.0]
EXTREME_ROWS = {
    "random": random_logits(),
    "float32 extremes": torch.tensor([FLOAT32_MAX, -FLOAT32_MAX, 0.0] * 4, dtype=torch.float64),
    "float64 extremes": torch.tensor([FLOAT64_MAX, -FLOAT64_MAX, FLOAT64_MAX, 1.0], dtype=torch.float64),
    "subnormal gaps": torch.tensor([5e-324, 0.0, -5e-324, 1e-308], dtype=torch.float64),
    "all equal": torch.zeros(VOCAB, dtype=torch.float64),
    "some inf and nan": torch.tensor([math.inf, math.nan, -math.inf, 3.0, math.inf], dtype=torch.float64),
    "one finite": torch.tensor([-math.inf, math.nan, 7.0, -math.inf], dtype=torch.float64),
}


@pytest.mark.parametrize("row", EXTREME_ROWS.values(), ids=EXTREME_ROWS.keys())
@pytest.mark.parametrize("temperature", EXTREME_TEMPERATURES)
@pytest.mark.parametrize("top_p", EXTREME_TOP_PS)
def test_every_accepted_temperature_and_top_p_chooses_a_token_that_can_be_chosen(row, temperature, top_p):
    sampled = draw(row, temperature=temperature, top_p=top_p, logprobs=True, top_logprobs=3)
    adjusted = torch.nan_to_num(row, nan=-math.inf)
    assert 0 <= sampled.token_id < row.numel()
    assert adjusted[sampled.token_id] > -math.inf, "a NaN or -inf logit is never chosen"
    assert LOGPROB_MIN <= sampled.logprob <= 0.0
    assert all(LOGPROB_MIN <= value <= 0.0 for _, value in sampled.top_logprobs)


@pytest.mark.parametrize("top_p", [5e-324, 1e-46, 1e-38, 1e-9])
def test_a_tiny_top_p_keeps_only_the_most_likely_token(top_p):
    logits = random_logits(3)
    for seed in range(20):
        assert draw(logits, seed=seed, temperature=1.0, top_p=top_p).token_id == int(logits.argmax())


@pytest.mark.parametrize("temperature", [5e-324, 1e-46, 1e-38, 1e-6, 1e-5])
def test_a_tiny_temperature_is_argmax(temperature):
    logits = random_logits(4)
    for seed in range(10):
        assert draw(logits, seed=seed, temperature=temperature).token_id == int(logits.argmax())


def test_top_p_draws_only_from_the_smallest_prefix_reaching_it():
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = probabilities.log()
    drawn = {draw(logits, seed=seed, temperature=1.0, top_p=0.7).token_id for seed in range(200)}
    assert drawn == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it; 2 and 3 are cut
    everything = {draw(logits, seed=seed, temperature=1.0, top_p=1.0).token_id for seed in range(400)}
    assert everything == {0, 1, 2, 3}


def test_a_seeded_draw_replays():
    logits = random_logits(5, scale=1.0)
    first = [draw(logits, seed=seed, temperature=1.3, top_p=0.95).token_id for seed in range(30)]
    again = [draw(logits, seed=seed, temperature=1.3, top_p=0.95).token_id for seed in range(30)]
    assert first == again and len(set(first)) > 1


def test_a_row_without_a_finite_logit_raises_a_sampling_error():
    for row in (
        torch.full((4,), math.nan, dtype=torch.float64),
        torch.full((4,), -math.inf, dtype=torch.float64),
    ):
        with pytest.raises(SamplingError):
            draw(row, temperature=1.0)
        with pytest.raises(SamplingError):
            draw(row)


def test_a_failing_row_fails_alone_and_plain_greedy_rows_take_the_argmax():
    logits = torch.stack(
        [random_logits(0), torch.full((VOCAB,), math.nan, dtype=torch.float64), random_logits(1)]
    )
    logits = logits.to(torch.float32)
    params = [
        SamplingParams(max_tokens=1),
        SamplingParams(max_tokens=1, temperature=1.0),
        SamplingParams(max_tokens=1, temperature=0.7),
    ]
    results = sample_next_tokens(logits, params, [None, new_generator(1), new_generator(2)], [[], [], []])
    assert results[0] == SampledToken(int(logits[0].argmax()))
    assert isinstance(results[1], RowFailure) and "no finite logit" in results[1].error
    assert isinstance(results[2], SampledToken)


def test_logit_bias_forces_and_bans_tokens():
    logits = random_logits(6)
    top = int(logits.argmax())
    weakest = int(logits.argmin())
    assert draw(logits, logit_bias=((weakest, 100.0),)).token_id == weakest
    assert draw(logits, logit_bias=((top, -100.0),)).token_id != top
    assert draw(logits, logit_bias=((top, -100.0),)).token_id == int(logits.topk(2).indices[1])
    banned = tuple((token_id, -100.0) for token_id in range(VOCAB) if token_id != weakest)
    for seed in range(20):
        assert draw(logits, seed=seed, temperature=2.0, logit_bias=banned).token_id == weakest


def test_penalties_follow_openais_formula():
    logits = torch.tensor([3.0, 2.2, 1.0, 0.0], dtype=torch.float64)
    history = [0, 0, 0, 1]  # token 0 three times, token 1 once
    expected = logits - 0.5 * torch.tensor([3.0, 1.0, 0.0, 0.0]) - 0.25 * torch.tensor([1.0, 1.0, 0.0, 0.0])
    sampled = draw(
        logits,
        output_token_ids=history,
        frequency_penalty=0.5,
        presence_penalty=0.25,
        logprobs=True,
        top_logprobs=4,
    )
    expected_logprobs = torch.log_softmax(expected, dim=-1)
    assert sampled.top_logprobs == tuple(
        (int(i), pytest.approx(float(expected_logprobs[i])))
        for i in expected_logprobs.argsort(descending=True)
    )
    assert sampled.token_id == int(expected.argmax()) == 1  # 3 - 1.5 - 0.25 < 2.2 - 0.5 - 0.25
    # A negative penalty encourages repetition; no history, no penalty.
    assert draw(logits, output_token_ids=[3], presence_penalty=-2.0, frequency_penalty=-2.0).token_id == 3
    assert draw(logits, output_token_ids=[], presence_penalty=2.0, frequency_penalty=2.0).token_id == 0


def test_logprobs_are_of_the_adjusted_distribution_before_temperature_and_top_p():
    logits = random_logits(7, scale=1.0)
    bias = ((5, 2.5),)
    adjusted = logits.clone()
    adjusted[5] += 2.5
    expected = torch.log_softmax(adjusted, dim=-1)
    sampled = draw(logits, seed=3, temperature=0.5, top_p=0.5, logit_bias=bias, logprobs=True, top_logprobs=5)
    assert sampled.logprob == pytest.approx(float(expected[sampled.token_id]))
    values = [value for _, value in sampled.top_logprobs]
    assert values == sorted(values, reverse=True) and len(values) == 5
    assert [token_id for token_id, _ in sampled.top_logprobs] == expected.topk(5).indices.tolist()
    greedy = draw(logits, logprobs=True, top_logprobs=1)
    assert greedy.top_logprobs == ((greedy.token_id, greedy.logprob),)


def test_logprobs_of_impossible_tokens_are_floored_not_infinite():
    logits = torch.tensor([0.0, -math.inf, math.nan, -1e300], dtype=torch.float64)
    sampled = draw(logits, logprobs=True, top_logprobs=4)
    assert sampled.token_id == 0 and sampled.logprob == 0.0
    assert [value for _, value in sampled.top_logprobs] == [0.0, LOGPROB_MIN, LOGPROB_MIN, LOGPROB_MIN]


def test_no_logprobs_unless_asked():
    sampled = draw(random_logits(8), seed=1, temperature=1.0)
    assert sampled.logprob is None and sampled.top_logprobs == ()


logit_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([FLOAT32_MAX, -FLOAT32_MAX, FLOAT64_MAX, -FLOAT64_MAX, 5e-324, 0.0]),
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    logits=st.lists(logit_values, min_size=1, max_size=12),
    temperature=st.one_of(
        st.sampled_from([0.0, 5e-324, 1e-46, 1e-38, TEMPERATURE_MAX]), st.floats(0.0, TEMPERATURE_MAX)
    ),
    top_p=st.one_of(st.sampled_from([5e-324, 1e-46, 1e-38, 1.0]), st.floats(0.0, 1.0, exclude_min=True)),
    bias=st.floats(-LOGIT_BIAS_MAX, LOGIT_BIAS_MAX),
    presence_penalty=st.floats(-PENALTY_MAX, PENALTY_MAX),
    frequency_penalty=st.floats(-PENALTY_MAX, PENALTY_MAX),
    history=st.lists(st.integers(0, 11), max_size=20),
    seed=st.integers(SEED_MIN, SEED_MAX),
)
def test_no_logits_and_accepted_parameters_make_the_sampler_raise_unless_nothing_is_finite(
    logits, temperature, top_p, bias, presence_penalty, frequency_penalty, history, seed
):
    row = torch.tensor(logits, dtype=torch.float64)
    history = [token_id for token_id in history if token_id < row.numel()]
    params = dict(
        temperature=temperature,
        top_p=top_p,
        logit_bias=((0, bias),),
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logprobs=True,
        top_logprobs=3,
    )
    if not bool(torch.isfinite(torch.nan_to_num(row, nan=-math.inf, posinf=1.0)).any()):
        with pytest.raises(SamplingError):
            draw(row, seed=seed, output_token_ids=history, **params)
        return
    sampled = draw(row, seed=seed, output_token_ids=history, **params)
    assert 0 <= sampled.token_id < row.numel()
    assert not math.isnan(row[sampled.token_id]) and row[sampled.token_id] > -math.inf
    assert LOGPROB_MIN <= sampled.logprob <= 0.0
    values = [value for _, value in sampled.top_logprobs]
    assert values == sorted(values, reverse=True) and all(LOGPROB_MIN <= value <= 0.0 for value in values)
