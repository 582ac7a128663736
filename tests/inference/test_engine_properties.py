"""Property tests of the engine over every sampling parameter at its bounds and beyond (issue #11):
each request is either refused at once with InvalidRequest, leaving nothing scheduled, or runs to a
normal finish; step() never raises and the engine keeps serving, whatever its neighbours asked for."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference.engine import Engine, GenerationRequest, RequestOutput
from inference.request import (
    LOGIT_BIAS_ENTRIES_MAX,
    LOGIT_BIAS_MAX,
    PENALTY_MAX,
    SEED_MAX,
    SEED_MIN,
    TEMPERATURE_GREEDY_BELOW,
    TEMPERATURE_MAX,
    TOP_LOGPROBS_MAX,
    FinishReason,
    InvalidRequest,
)
from inference.sampler import LOGPROB_MIN
from tests.inference.conftest import engine_settings

STEPS_PER_REQUEST_MAX = 64  # far more than a prompt of a few tokens and max_tokens <= 6 need
EXAMPLES = 100
VOCABULARY = 2048  # the default model's
TINY = [5e-324, 1e-46, 1e-38]  # a subnormal and the values from the issue
BEYOND_FLOATS = [math.nan, math.inf, -math.inf, 1e308, -1e308]

# Accepted values, the bounds and the tiniest numbers included.
VALID = {
    "temperature": st.one_of(
        st.sampled_from(
            [0.0, *TINY, TEMPERATURE_GREEDY_BELOW * 0.999, TEMPERATURE_GREEDY_BELOW, TEMPERATURE_MAX]
        ),
        st.floats(0.0, TEMPERATURE_MAX),
    ),
    "top_p": st.one_of(st.sampled_from([*TINY, 0.5, 1.0]), st.floats(0.0, 1.0, exclude_min=True)),
    "seed": st.one_of(
        st.none(), st.sampled_from([SEED_MIN, SEED_MAX, 0, -1]), st.integers(SEED_MIN, SEED_MAX)
    ),
    "max_tokens": st.integers(1, 6),
    "stop": st.lists(st.text(min_size=1, max_size=64), max_size=4).map(tuple),
    "tier": st.sampled_from(["standard", "enterprise", "free"]),
    "logit_bias": st.one_of(
        st.none(),
        st.dictionaries(
            st.one_of(st.sampled_from([0, VOCABULARY - 1]), st.integers(0, VOCABULARY - 1)),
            st.one_of(
                st.sampled_from([-LOGIT_BIAS_MAX, LOGIT_BIAS_MAX, 0.0, *TINY]),
                st.floats(-LOGIT_BIAS_MAX, LOGIT_BIAS_MAX),
            ),
            max_size=6,
        ),
        st.just({token_id: 1.0 for token_id in range(LOGIT_BIAS_ENTRIES_MAX)}),
    ),
    "presence_penalty": st.one_of(
        st.sampled_from([-PENALTY_MAX, PENALTY_MAX, 0.0, *TINY]), st.floats(-PENALTY_MAX, PENALTY_MAX)
    ),
    "frequency_penalty": st.one_of(
        st.sampled_from([-PENALTY_MAX, PENALTY_MAX, 0.0, *TINY]), st.floats(-PENALTY_MAX, PENALTY_MAX)
    ),
}
# Values just beyond each bound and far beyond it; each must be refused.
BEYOND = {
    "temperature": st.one_of(
        st.sampled_from([-5e-324, -1e-38, TEMPERATURE_MAX + 1e-9, *BEYOND_FLOATS]),
        st.floats(min_value=TEMPERATURE_MAX, exclude_min=True),
    ),
    "top_p": st.sampled_from([0.0, -0.0, -1e-46, 1.0000001, *BEYOND_FLOATS]),
    "seed": st.one_of(
        st.sampled_from([SEED_MIN - 1, SEED_MAX + 1, 2**100, -(2**100)]), st.integers(min_value=SEED_MAX + 1)
    ),
    "max_tokens": st.sampled_from([0, -1, 2**63, 10**30, 1.5, 4.0, None]),
    "stop": st.sampled_from([("",), ("a" * 65,), ("a", "b", "c", "d", "e"), "stop", (None,)]),
    "tier": st.sampled_from(["platinum", "", None]),
    "logit_bias": st.sampled_from(
        [
            {-1: 1.0},
            {VOCABULARY: 1.0},
            {2**70: 1.0},
            {5: LOGIT_BIAS_MAX + 1e-9},
            {5: -math.inf},
            {5: math.nan},
            {"5": 1.0},
            {token_id: 1.0 for token_id in range(LOGIT_BIAS_ENTRIES_MAX + 1)},
            [(5, 1.0)],
        ]
    ),
    "presence_penalty": st.sampled_from([PENALTY_MAX + 1e-9, -PENALTY_MAX - 1e-9, *BEYOND_FLOATS, None]),
    "frequency_penalty": st.sampled_from([PENALTY_MAX + 1e-9, -PENALTY_MAX - 1e-9, *BEYOND_FLOATS, "0"]),
    "top_logprobs": st.sampled_from([-1, TOP_LOGPROBS_MAX + 1, 2**70]),
    "logprobs": st.sampled_from([1, "true", None]),
}


@st.composite
def generation_requests(draw, request_id: str) -> tuple[GenerationRequest, str | None]:
    """A request valid at the bounds, or (half the time) with one field pushed beyond: (request, that
    field)."""

    beyond = draw(st.one_of(st.none(), st.sampled_from(sorted(BEYOND))))
    values = {field: draw(strategy) for field, strategy in VALID.items()}
    values["logprobs"] = draw(st.booleans())
    values["top_logprobs"] = draw(st.integers(0, TOP_LOGPROBS_MAX)) if values["logprobs"] else 0
    if beyond is not None:
        values[beyond] = draw(BEYOND[beyond])
    if beyond == "top_logprobs" and draw(st.booleans()):  # in range, but without logprobs
        values["logprobs"], values["top_logprobs"] = False, draw(st.integers(1, TOP_LOGPROBS_MAX))
    prompt = draw(st.sampled_from(["The", "x", "GNU GENERAL PUBLIC LICENSE\n", "\u00e9\u4e2d"]))
    return GenerationRequest(request_id=request_id, prompt=prompt, **values), beyond


@pytest.fixture(scope="module")
def engine(default_models, tokenizer) -> Engine:
    return Engine(default_models("cpu", torch.float32), tokenizer, engine_settings(running_sequences_max=3))


_request_numbers = itertools.count()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run: a bounded, reproducible suite
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_every_request_is_refused_cleanly_or_finishes_and_the_engine_serves_on(engine, data):
    batch = [
        data.draw(generation_requests(f"p{next(_request_numbers)}"))
        for _ in range(data.draw(st.integers(1, 4)))
    ]
    accepted: dict[str, GenerationRequest] = {}
    for generation, beyond in batch:
        if beyond is None:
            engine.add_request(generation)
            accepted[generation.request_id] = generation
            continue
        with pytest.raises(InvalidRequest, match=beyond):  # the message names the field
            engine.add_request(generation)
        assert generation.request_id not in engine.scheduler.requests, "a refused request was scheduled"
        assert generation.request_id not in engine._generators | engine._detokenizers

    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(STEPS_PER_REQUEST_MAX * len(batch)):
        for output in engine.step():  # never raises
            outputs.setdefault(output.request_id, []).append(output)
        if not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests(), "the engine did not finish the batch"
    assert engine.scheduler.kv.usage() == 0.0, "a KV block leaked"
    assert engine._generators == {} and engine._detokenizers == {}
    assert set(outputs) == set(accepted)
    for request_id, generation in accepted.items():
        check_finished_normally(generation, outputs[request_id])


def check_finished_normally(generation: GenerationRequest, outputs: list[RequestOutput]) -> None:
    final = outputs[-1]
    assert [output.finished for output in outputs] == [False] * (len(outputs) - 1) + [True]
    assert final.finish_reason in (FinishReason.STOP, FinishReason.LENGTH), final.error
    assert final.error is None
    tokens = [output for output in outputs if output.token_id is not None]
    assert final.completion_tokens == len(tokens) <= generation.max_tokens
    for output in tokens:
        if not generation.logprobs:
            assert output.logprob is None and output.top_logprobs == ()
            continue
        assert output.logprob.token_id == output.token_id
        assert LOGPROB_MIN <= output.logprob.logprob <= 0.0
        values = [token.logprob for token in output.top_logprobs]
        assert len(values) == generation.top_logprobs and values == sorted(values, reverse=True)
        assert all(LOGPROB_MIN <= value <= 0.0 for value in values)
    for token_id, bias in (generation.logit_bias or {}).items():
        if bias == -LOGIT_BIAS_MAX and generation.temperature < TEMPERATURE_GREEDY_BELOW:
            assert token_id not in [output.token_id for output in tokens], (
                "a banned token was chosen by argmax"
            )
