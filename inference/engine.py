"""The inference engine: validate and queue requests, then step: schedule -> execute -> update.

`Engine` is synchronous and owns the model, the KV cache and the scheduler. `add_request` and
`abort_request` may be called from any thread (they take the engine's lock); `step()` is called by one
thread at a time (the serving loop in `inference.async_engine`, or a test). A cancel is applied at the
start and at the end of the next step, so its slot and cache are free for the step after.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from inference.checkpoint import CausalLM, load_model
from inference.detokenizer import IncrementalDetokenizer
from inference.model import KVCache, PackedBatch
from inference.queue_policy import create_waiting_queue
from inference.request import FinishReason, InvalidRequest, Request, SamplingParams
from inference.sampler import new_generator, sample_next_tokens
from inference.scheduler import Scheduler, SchedulerOutput
from inference.settings import EngineSettings
from inference.tokenizer import TextTokenizer

TEMPERATURE_MAX = 2.0


@dataclass(frozen=True)
class GenerationRequest:
    """What a caller submits. Give exactly one of prompt (text) or prompt_token_ids."""

    request_id: str
    max_tokens: int
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    tier: str = "standard"
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: at most one token, and the end when it finished."""

    request_id: str
    token_id: int | None  # the new token, None when the step only finished the request
    text: str  # newly final text (may be empty even with a token: held back or past a stop)
    finish_reason: FinishReason | None  # set on the request's last output
    prompt_tokens: int  # prompt tokens processed so far
    completion_tokens: int  # completion tokens produced so far

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StepStats:
    scheduled_sequences: int
    scheduled_tokens: int
    generated_tokens: int
    waiting: int
    running: int


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        # Half precision halves cache memory and speeds up GPU matmuls; CPU kernels are fastest in fp32.
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, requested)


class Engine:
    def __init__(
        self,
        model: CausalLM,
        tokenizer: TextTokenizer,
        settings: EngineSettings,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        if settings.context_tokens_max > model.config.block_size:
            raise ValueError(
                f"context_tokens_max {settings.context_tokens_max} exceeds the model's block_size {model.config.block_size}"
            )
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}")
        parameter = next(model.parameters())
        self.model = model.eval()
        self.device, self.dtype = parameter.device, parameter.dtype
        self.tokenizer = tokenizer
        self.settings = settings
        self.cache = KVCache(
            model.config, settings.running_sequences_max, settings.context_tokens_max, self.device, self.dtype
        )
        self.scheduler = Scheduler(
            waiting=create_waiting_queue(settings.queue_policy, settings.aging_ms_per_tier_level),
            cache=self.cache,
            running_sequences_max=settings.running_sequences_max,
            step_tokens_max=settings.step_tokens_max,
            prefill_chunk_tokens_max=settings.prefill_chunk_tokens_max,
            waiting_queue_depth_max=settings.waiting_queue_depth_max,
            eos_token_id=model.config.eos_token_id,
        )
        self._clock_ms = clock_ms or (lambda: time.monotonic_ns() // 1_000_000)
        self._lock = threading.Lock()
        self._pending_aborts: set[str] = set()
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._arrivals = 0
        self.last_step_stats = StepStats(0, 0, 0, 0, 0)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path, settings: EngineSettings) -> Engine:
        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        device = resolve_device(settings.device)
        model = load_model(checkpoint_dir, device, resolve_dtype(settings.dtype, device))
        return cls(model, TextTokenizer.from_directory(checkpoint_dir), settings)

    # ---- called from any thread -------------------------------------------------------------------

    def add_request(self, generation: GenerationRequest) -> Request:
        """Validate and queue; raises InvalidRequest (bad input) or Overloaded (queue full) at once."""
        prompt_token_ids = self._prompt_token_ids(generation)
        sampling = self._sampling_params(generation, len(prompt_token_ids))
        tier_level = self.settings.tier_levels.get(generation.tier)
        if tier_level is None:
            raise InvalidRequest(f"tier {generation.tier!r} is not one of {sorted(self.settings.tier_levels)}")
        with self._lock:
            if generation.request_id in self.scheduler.requests:
                raise InvalidRequest(f"request_id {generation.request_id!r} is already in flight")
            self._arrivals += 1
            request = Request(
                request_id=generation.request_id,
                prompt_token_ids=prompt_token_ids,
                sampling=sampling,
                tier_level=tier_level,
                arrival_ms=self._clock_ms(),
                arrival_index=self._arrivals,
            )
            self.scheduler.add_request(request)  # raises Overloaded when the waiting queue is full
            self._detokenizers[request.request_id] = IncrementalDetokenizer(self.tokenizer, sampling.stop)
            if not sampling.greedy:
                self._generators[request.request_id] = new_generator(sampling.seed)
        return request

    def abort_request(self, request_id: str) -> None:
        """Cancel a request; its final output (finish_reason cancelled) comes from the next step."""
        with self._lock:
            if request_id in self.scheduler.requests:
                self._pending_aborts.add(request_id)

    def abort_all(self) -> None:
        with self._lock:
            self._pending_aborts.update(self.scheduler.requests)

    def finish_all_now(self) -> list[RequestOutput]:
        """Cancel every unfinished request at once (the step loop is gone); returns their final outputs."""
        with self._lock:
            self._pending_aborts.update(self.scheduler.requests)
            return self._apply_aborts()

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return self.scheduler.has_unfinished_requests()

    def queue_depth(self) -> tuple[int, int]:
        """(waiting, running)."""
        with self._lock:
            return len(self.scheduler.waiting), len(self.scheduler.running)

    # ---- the step loop (one thread) ---------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        with self._lock:
            outputs = self._apply_aborts()
            scheduler_output = self.scheduler.schedule()
        sampled = self._execute(scheduler_output) if scheduler_output.chunks else {}
        with self._lock:
            outputs += self._update(scheduler_output, sampled)
            outputs += self._apply_aborts()
            self.last_step_stats = StepStats(
                scheduled_sequences=len(scheduler_output.chunks),
                scheduled_tokens=scheduler_output.total_num_scheduled_tokens,
                generated_tokens=len(sampled),
                waiting=len(self.scheduler.waiting),
                running=len(self.scheduler.running),
            )
        return outputs

    @torch.inference_mode()
    def _execute(self, scheduler_output: SchedulerOutput) -> dict[str, int]:
        chunks = scheduler_output.chunks
        batch = PackedBatch.build(
            slots=[chunk.request.slot for chunk in chunks],
            starts=[chunk.start for chunk in chunks],
            chunks=[chunk.token_ids for chunk in chunks],
            device=self.device,
            dtype=self.dtype,
        )
        logits = self.model.forward_packed(batch, self.cache)  # (S, vocab)
        rows = [i for i, chunk in enumerate(chunks) if chunk.completes_sequence]
        if not rows:
            return {}
        requests = [chunks[i].request for i in rows]
        row_index = torch.tensor(rows, dtype=torch.long, device=self.device)
        logits = logits.index_select(0, row_index)[:, : self.tokenizer.vocab_size]  # padded vocab never sampled
        token_ids = sample_next_tokens(
            logits,
            [request.sampling for request in requests],
            [self._generators.get(request.request_id) for request in requests],
        )
        return {request.request_id: token_id for request, token_id in zip(requests, token_ids, strict=True)}

    def _update(self, scheduler_output: SchedulerOutput, sampled: dict[str, int]) -> list[RequestOutput]:
        outputs = []
        for request in self.scheduler.update_from_output(scheduler_output, sampled):
            detokenizer = self._detokenizers[request.request_id]
            text = detokenizer.push(request.output_token_ids[-1])
            if detokenizer.stopped:
                if request.finish_reason is None:
                    self.scheduler.finish_requests([request.request_id], FinishReason.STOP)
                else:
                    request.finish_reason = FinishReason.STOP  # the stop text came with the last token
            elif request.finish_reason is not None:
                text += detokenizer.flush()
            outputs.append(self._output(request, token_id=request.output_token_ids[-1], text=text))
        return outputs

    def _apply_aborts(self) -> list[RequestOutput]:
        if not self._pending_aborts:
            return []
        cancelled = self.scheduler.finish_requests(sorted(self._pending_aborts), FinishReason.CANCELLED)
        self._pending_aborts.clear()
        return [self._output(request, token_id=None, text="") for request in cancelled]

    def _output(self, request: Request, token_id: int | None, text: str) -> RequestOutput:
        if request.finish_reason is not None:
            self._detokenizers.pop(request.request_id, None)
            self._generators.pop(request.request_id, None)
        return RequestOutput(
            request_id=request.request_id,
            token_id=token_id,
            text=text,
            finish_reason=request.finish_reason,
            prompt_tokens=request.prompt_tokens_processed,
            completion_tokens=request.completion_tokens,
        )

    # ---- validation -------------------------------------------------------------------------------

    def _prompt_token_ids(self, generation: GenerationRequest) -> list[int]:
        if (generation.prompt is None) == (generation.prompt_token_ids is None):
            raise InvalidRequest("give exactly one of prompt or prompt_token_ids")
        if generation.prompt is not None:
            token_ids = self.tokenizer.encode(generation.prompt)
        else:
            token_ids = list(generation.prompt_token_ids)
            vocab_size = self.tokenizer.vocab_size
            if any(not 0 <= token_id < vocab_size for token_id in token_ids):
                raise InvalidRequest(f"prompt_token_ids must be in 0..{vocab_size - 1}")
        if not token_ids:
            raise InvalidRequest("prompt is empty: it must hold at least one token")
        return token_ids

    def _sampling_params(self, generation: GenerationRequest, prompt_tokens: int) -> SamplingParams:
        context_max = self.settings.context_tokens_max
        if generation.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1")
        if prompt_tokens + generation.max_tokens > context_max:
            raise InvalidRequest(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({generation.max_tokens}) exceeds the context of {context_max} tokens"
            )
        if not 0.0 <= generation.temperature <= TEMPERATURE_MAX:
            raise InvalidRequest(f"temperature must be in 0..{TEMPERATURE_MAX}")
        if not 0.0 < generation.top_p <= 1.0:
            raise InvalidRequest("top_p must be in (0, 1]")
        stop = tuple(generation.stop)
        if len(stop) > self.settings.stop_sequences_max:
            raise InvalidRequest(f"stop holds at most {self.settings.stop_sequences_max} sequences")
        if any(not 0 < len(s) <= self.settings.stop_sequence_chars_max for s in stop):
            raise InvalidRequest(f"each stop sequence must be 1..{self.settings.stop_sequence_chars_max} characters")
        return SamplingParams(
            max_tokens=generation.max_tokens,
            temperature=float(generation.temperature),
            top_p=float(generation.top_p),
            seed=generation.seed,
            stop=stop,
        )
