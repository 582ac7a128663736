"""Next-token choice per sequence: greedy (argmax) or temperature + nucleus (top-p) sampling, with
OpenAI's logit_bias, presence and frequency penalties and logprobs.

Rows that ask for nothing but argmax take one batched argmax on the device (the fast path). Every
other row is chosen on the CPU in float64 by `sample_row`, which no finite input can make raise:

1. logits: NaN -> -inf (never chosen), +inf -> the largest float64 (a certain token stays certain
   without inf - inf);
2. + logit_bias, then - frequency_penalty * count - presence_penalty * (count > 0) per token, counted
   over the request's generated tokens (OpenAI's formula);
3. logprobs (when asked) are the log-softmax of these adjusted logits: the model's distribution after
   logit_bias and penalties, BEFORE temperature and top_p (as OpenAI and vLLM report them), floored at
   LOGPROB_MIN so every value is a finite JSON number;
4. temperature below TEMPERATURE_GREEDY_BELOW: argmax. Otherwise log-softmax((logits - max) /
   temperature): the largest term is exactly 0, so nothing overflows to +inf however small the
   temperature; top_p keeps the smallest prefix of tokens (most likely first) whose mass reaches
   top_p, and always the most likely token, so every accepted top_p leaves something to draw;
   multinomial draws from what is left with the request's own generator.

A row with no finite logit at all (the model produced NaN or -inf everywhere) raises SamplingError;
`sample_next_tokens` turns any exception in one row into a RowFailure for that row only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from inference.request import SamplingParams

LOGPROB_MIN = -9999.0  # reported for tokens the distribution gives (next to) no mass, as OpenAI does
_FLOAT64_MAX = torch.finfo(torch.float64).max


class SamplingError(ArithmeticError):
    """A row's logits leave nothing to choose (no finite logit)."""


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None  # of the chosen token, when logprobs were asked
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class RowFailure:
    """Choosing this row's token raised; only its request fails."""

    error: str


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator per request: seeded requests replay exactly, whatever else is in the batch."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample_next_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    output_token_ids: list[list[int]],
) -> list[SampledToken | RowFailure]:
    """One token (or the failure) per row of logits (S, vocab)."""
    rows = logits.size(0)
    assert logits.dim() == 2, f"logits are (requests, vocab), got {logits.dim()} dimensions"
    assert rows == len(params) == len(generators) == len(output_token_ids), "one request per row"
    results: list[SampledToken | RowFailure | None] = [None] * rows
    plain = [row for row in range(rows) if params[row].plain_greedy]
    other = [row for row in range(rows) if not params[row].plain_greedy]
    if plain:  # fast path: one batched argmax, one transfer
        chosen = logits.index_select(0, torch.tensor(plain, device=logits.device)).argmax(dim=-1).tolist()
        for row, token_id in zip(plain, chosen, strict=True):
            results[row] = SampledToken(token_id)
    if other:  # one transfer for every other row, then each on its own: a failure stays in its row
        on_cpu = logits.index_select(0, torch.tensor(other, device=logits.device)).to("cpu", torch.float64)
        for index, row in enumerate(other):
            try:
                results[row] = sample_row(on_cpu[index], params[row], generators[row], output_token_ids[row])
            except Exception as error:  # noqa: BLE001 - any failure of one row fails that request only
                results[row] = RowFailure(f"sampling failed: {type(error).__name__}: {error}")
    assert all(result is not None for result in results), "every row got a token or a failure"
    return results  # type: ignore[return-value]


def sample_row(
    logits: torch.Tensor,
    param: SamplingParams,
    generator: torch.Generator | None,
    output_token_ids: list[int],
) -> SampledToken:
    """Choose one token from one row of logits (vocab,), float64 on the CPU; see the module docstring."""
    assert logits.dim() == 1, "one row"
    assert logits.dtype == torch.float64, f"a float64 row, got {logits.dtype}"
    adjusted = _adjusted_logits(logits, param, output_token_ids)
    if not bool(torch.isfinite(adjusted).any()):
        raise SamplingError("the model produced no finite logit for this sequence")
    if param.greedy:
        token_id = int(adjusted.argmax())
    else:
        assert generator is not None, "a sampled request has a generator"
        assert math.isfinite(param.temperature), "temperature is finite (validated by the engine)"
        assert 0.0 < param.top_p <= 1.0, "top_p is in (0, 1] (validated by the engine)"
        token_id = _draw(adjusted, param, generator)
    if not param.logprobs:
        return SampledToken(token_id)
    logprobs = torch.log_softmax(adjusted, dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if param.top_logprobs > 0:
        values, ids = logprobs.topk(min(param.top_logprobs, logprobs.numel()))  # sorted, largest first
        top = tuple((int(i), _reported(float(v))) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
    return SampledToken(token_id, logprob=_reported(float(logprobs[token_id])), top_logprobs=top)


def _adjusted_logits(
    logits: torch.Tensor, param: SamplingParams, output_token_ids: list[int]
) -> torch.Tensor:
    adjusted = torch.nan_to_num(logits, nan=-math.inf, posinf=_FLOAT64_MAX, neginf=-math.inf)
    if param.logit_bias:
        ids = torch.tensor([token_id for token_id, _ in param.logit_bias], dtype=torch.long)
        biases = torch.tensor([bias for _, bias in param.logit_bias], dtype=torch.float64)
        adjusted = adjusted.index_add(0, ids, biases)
    if output_token_ids and (param.presence_penalty != 0.0 or param.frequency_penalty != 0.0):
        counts = torch.bincount(torch.tensor(output_token_ids, dtype=torch.long), minlength=adjusted.numel())
        counts = counts[: adjusted.numel()].to(torch.float64)
        adjusted = (
            adjusted
            - param.frequency_penalty * counts
            - param.presence_penalty * (counts > 0).to(torch.float64)
        )
    return torch.nan_to_num(adjusted, nan=-math.inf, posinf=_FLOAT64_MAX, neginf=-math.inf)


def _draw(adjusted: torch.Tensor, param: SamplingParams, generator: torch.Generator) -> int:
    shifted = adjusted - adjusted.max()  # <= 0, the largest exactly 0: no overflow at any temperature
    probabilities = torch.log_softmax(
        shifted / param.temperature, dim=-1
    ).exp()  # (vocab,), the max >= 1/vocab
    if param.top_p < 1.0:
        sorted_probabilities, order = probabilities.sort(descending=True)
        mass_before = sorted_probabilities.cumsum(dim=-1) - sorted_probabilities
        keep = mass_before < param.top_p  # the smallest prefix reaching top_p
        keep[0] = True  # the most likely token always stays, however small top_p is
        kept = torch.where(keep, sorted_probabilities, torch.zeros_like(sorted_probabilities))
        probabilities = torch.zeros_like(probabilities).scatter_(0, order, kept)
    return int(torch.multinomial(probabilities, num_samples=1, generator=generator))


def _reported(logprob: float) -> float:
    """A log-probability as reported: at most 0, at least LOGPROB_MIN (never -inf or NaN)."""
    if math.isnan(logprob):
        return LOGPROB_MIN
    return min(0.0, max(LOGPROB_MIN, logprob))
