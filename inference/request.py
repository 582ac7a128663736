"""One generation request as the scheduler tracks it, and the parameters it was submitted with."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class InvalidRequest(ValueError):
    """Bad input from the caller; the message names the field."""


class Overloaded(RuntimeError):
    """The waiting queue is full; the caller may retry later."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # a stop sequence or the end-of-text token
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # aborted by the caller (or by shutdown)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy (deterministic)
    top_p: float = 1.0
    seed: int | None = None  # fixes the sampled sequence for temperature > 0
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    tier_level: int  # lower is served first
    arrival_ms: int  # monotonic milliseconds when it was added
    arrival_index: int  # tie-breaker: order of arrival
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose keys/values are in the cache
    slot: int | None = None
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def prompt_tokens_processed(self) -> int:
        """Prompt tokens that went through the model (fewer than the prompt if cancelled mid-prefill)."""
        return min(self.num_computed_tokens, self.num_prompt_tokens)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_slice(self, start: int, count: int) -> list[int]:
        prompt_length = self.num_prompt_tokens
        if start + count <= prompt_length:
            return self.prompt_token_ids[start : start + count]
        all_tokens = self.prompt_token_ids + self.output_token_ids
        return all_tokens[start : start + count]
