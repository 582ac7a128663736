"""One generation request as the scheduler tracks it, and the parameters it was submitted with."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# Limits on the sampling parameters; the gateway and the worker import these to validate the same way.
SEED_MIN = -(2**63)  # the range torch.Generator.manual_seed accepts
SEED_MAX = 2**64 - 1
TEMPERATURE_MAX = 2.0
TOP_LOGPROBS_MAX = 20  # alternatives reported per token (OpenAI's bound)
LOGIT_BIAS_MAX = 100.0  # a bias is in [-LOGIT_BIAS_MAX, LOGIT_BIAS_MAX] (OpenAI's bound)
LOGIT_BIAS_ENTRIES_MAX = 300  # token ids one request may bias
PENALTY_MAX = 2.0  # presence and frequency penalties are in [-PENALTY_MAX, PENALTY_MAX] (OpenAI's bound)
# Below this temperature sampling is argmax: dividing logits by a smaller number only sharpens a
# distribution that is already a point mass in float64, and risks overflow (vLLM's _SAMPLING_EPS).
TEMPERATURE_GREEDY_BELOW = 1e-5


class InvalidRequest(ValueError):
    """Bad input from the caller; the message names the field."""


class WaitingQueueFull(RuntimeError):
    """The waiting queue is full; the caller may retry later."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # a stop sequence or the end-of-text token
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # aborted by the caller (or by shutdown)
    ERROR = "error"  # failed inside the engine (a bug, a numerical failure); only this request ends


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its log-probability, as OpenAI's `logprobs.content[]` (and `top_logprobs[]`) show it."""

    token_id: int
    token: str  # the token's text
    bytes: tuple[
        int, ...
    ]  # the bytes the token stands for (a partial UTF-8 character shows here, not in token)
    logprob: float


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy (deterministic)
    top_p: float = 1.0
    seed: int | None = None  # fixes the sampled sequence for temperature > 0
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # report the chosen token's log-probability
    top_logprobs: int = 0  # and this many most likely alternatives (only with logprobs)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, additive bias), ids unique
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature < TEMPERATURE_GREEDY_BELOW

    @property
    def adjusts_logits(self) -> bool:
        """True when logit_bias or a penalty changes the model's logits before the choice."""
        return bool(self.logit_bias) or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the model's logits, nothing else asked: the batched fast path."""
        return self.greedy and not self.adjusts_logits and not self.logprobs


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    tier_level: int  # lower is served first
    arrival_ms: int  # monotonic milliseconds when it was added
    arrival_index: int  # tie-breaker: order of arrival
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose keys/values are in the cache (0 again after preemption)
    # The most tokens ever computed: a preempted request recomputes its tokens, but they are billed once.
    num_computed_tokens_max: int = 0
    # Prompt tokens served from the prefix cache at its first admission (not computed for this request).
    num_cached_prompt_tokens: int = 0
    preemptions: int = 0  # times its blocks were taken back to make room (it was recomputed)
    queued_ms: int | None = None  # from arrival to its first step (the scheduler's queue); None until then
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None  # why, when finish_reason is ERROR

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def prompt_tokens_processed(self) -> int:
        """Prompt tokens processed, cached ones included (fewer than the prompt if cancelled mid-prefill);
        a prompt recomputed after preemption counts once."""
        return min(max(self.num_computed_tokens, self.num_computed_tokens_max), self.num_prompt_tokens)

    @property
    def cached_prompt_tokens(self) -> int:
        """Of `prompt_tokens_processed`, those served from the prefix cache."""
        return min(self.num_cached_prompt_tokens, self.prompt_tokens_processed)

    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def completion_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_slice(self, start: int, count: int) -> list[int]:
        prompt_length = self.num_prompt_tokens
        if start + count <= prompt_length:
            return self.prompt_token_ids[start : start + count]
        all_tokens = self.prompt_token_ids + self.output_token_ids
        return all_tokens[start : start + count]
