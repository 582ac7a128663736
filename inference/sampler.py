"""Next-token choice per sequence: greedy (argmax) or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import torch

from inference.request import SamplingParams


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator per request: seeded requests replay exactly, whatever else is in the batch."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample_next_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int]:
    """One token per row of logits (S, vocab)."""
    assert logits.dim() == 2 and logits.size(0) == len(params) == len(generators), "one param set per row"
    chosen = logits.argmax(dim=-1).tolist()  # greedy for every row; sampled rows overwrite below
    for row, (param, generator) in enumerate(zip(params, generators, strict=True)):
        if not param.greedy:
            chosen[row] = _sample_row(logits[row], param, generator)
    return chosen


def _sample_row(logits: torch.Tensor, param: SamplingParams, generator: torch.Generator) -> int:
    probabilities = torch.softmax(logits.float().cpu() / param.temperature, dim=-1)  # (vocab,)
    if param.top_p < 1.0:
        sorted_probabilities, order = probabilities.sort(descending=True)
        mass_before = sorted_probabilities.cumsum(dim=-1) - sorted_probabilities
        sorted_probabilities[mass_before >= param.top_p] = 0.0  # keep the smallest prefix reaching top_p
        probabilities = torch.zeros_like(probabilities).scatter_(0, order, sorted_probabilities)
    return int(torch.multinomial(probabilities, num_samples=1, generator=generator))
