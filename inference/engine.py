"""The inference engine: validate and queue requests, then step: schedule -> execute -> update.

`Engine` is synchronous and owns the model, the KV cache and the scheduler. `add_request` and
`abort_request` may be called from any thread (they take the engine's lock); `step()` is called by one
thread at a time (the serving loop in `inference.engine_loop`, or a test). A cancel is applied at the
start and at the end of the next step, so its KV blocks are free for the step after. The KV cache is
paged (`inference.paged_attention`, `inference.kv_cache_manager`): a request holds the blocks its tokens
need, starts from the longest cached prefix of its prompt, and is preempted and recomputed when memory
runs out (`inference.scheduler`).

No request can take the engine down with it: `add_request` checks everything (and builds the torch
generator) before anything is scheduled, so a refused request leaves nothing behind. In `step()`, a
failure in one request's own work (choosing its token, detokenizing, building its output) finishes
that request with FinishReason.ERROR and its error; the batch goes on. A failure of the batched
forward pass, which no single request can be blamed for, finishes every request of that step with
ERROR and frees their blocks, and the engine serves the next step.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from inference.checkpoint import CausalLM, load_model
from inference.detokenizer import IncrementalDetokenizer
from inference.kv_cache_manager import KVCacheManager
from inference.paged_attention import PagedBatch, PagedKVCache
from inference.queue_policy import create_waiting_queue
from inference.request import (
    LOGIT_BIAS_ENTRIES_MAX,
    LOGIT_BIAS_MAX,
    PENALTY_MAX,
    SEED_MAX,
    SEED_MIN,
    TEMPERATURE_MAX,
    TOP_LOGPROBS_MAX,
    FinishReason,
    InvalidRequest,
    Request,
    SamplingParams,
    TokenLogprob,
)
from inference.sampler import RowFailure, SampledToken, new_generator, sample_next_tokens
from inference.scheduler import Scheduler, SchedulerOutput
from inference.settings import EngineSettings
from inference.tokenizer import TextTokenizer


@dataclass(frozen=True)
class GenerationRequest:
    """What a caller submits. Give exactly one of prompt (text) or prompt_token_ids.

    The OpenAI extras follow OpenAI's definitions: logit_bias is added to the model's logits, then
    logit -= frequency_penalty * count + presence_penalty * (count > 0) over the tokens this request
    generated so far (greedy requests too). logprobs are the log-softmax of those adjusted logits: the
    model's distribution after logit_bias and penalties, before temperature and top_p (as OpenAI and
    vLLM report them), floored at inference.sampler.LOGPROB_MIN so they are finite.
    """

    request_id: str
    max_tokens: int
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    tier: str = "standard"
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0  # 0..TOP_LOGPROBS_MAX, only with logprobs
    logit_bias: dict[int, float] | None = (
        None  # token id -> additive bias in [-LOGIT_BIAS_MAX, LOGIT_BIAS_MAX]
    )
    presence_penalty: float = 0.0  # in [-PENALTY_MAX, PENALTY_MAX]
    frequency_penalty: float = 0.0  # in [-PENALTY_MAX, PENALTY_MAX]


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: at most one token, and the end when it finished."""

    request_id: str
    token_id: int | None  # the new token, None when the step only finished the request
    text: str  # newly final text (may be empty even with a token: held back or past a stop)
    finish_reason: FinishReason | None  # set on the request's last output
    prompt_tokens: int  # prompt tokens processed so far (cached ones included; a recomputed one once)
    completion_tokens: int  # completion tokens produced so far
    logprob: TokenLogprob | None = None  # the new token's, when logprobs were asked
    top_logprobs: tuple[TokenLogprob, ...] = ()  # most likely first, when top_logprobs > 0
    error: str | None = None  # why, when finish_reason is ERROR
    cached_prompt_tokens: int = 0  # of prompt_tokens, those served from the prefix cache
    queued_ms: int | None = None  # the request's time in the scheduler's queue (None: never scheduled)

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
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use after the step (0..1)
    preempted: int = 0  # requests preempted by the step


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
                f"context_tokens_max {settings.context_tokens_max} exceeds the model's block_size {model.config.block_size}"  # noqa: E501
            )
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}"
            )
        parameter = next(model.parameters())
        self.model = model.eval()
        self.device, self.dtype = parameter.device, parameter.dtype
        self.tokenizer = tokenizer
        self.settings = settings
        self.cache = PagedKVCache(
            model.config,
            settings.kv_cache_block_count,
            settings.kv_block_tokens,
            settings.context_tokens_max,
            self.device,
            self.dtype,
        )
        self.scheduler = Scheduler(
            waiting=create_waiting_queue(settings.queue_policy, settings.aging_ms_per_tier_level),
            kv=KVCacheManager(
                settings.kv_cache_block_count, settings.kv_block_tokens, settings.prefix_caching
            ),
            running_sequences_max=settings.running_sequences_max,
            step_tokens_max=settings.step_tokens_max,
            prefill_chunk_tokens_max=settings.prefill_chunk_tokens_max,
            waiting_queue_depth_max=settings.waiting_queue_depth_max,
            context_tokens_max=settings.context_tokens_max,
            eos_token_id=model.config.eos_token_id,
        )
        self._clock_ms = clock_ms or (lambda: time.monotonic_ns() // 1_000_000)
        self._lock = threading.Lock()
        self._pending_aborts: set[str] = set()
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._arrivals = 0
        self.last_step_stats = StepStats(0, 0, 0, 0, 0)
        self.computed_tokens_total = 0  # tokens fed through the model since start (cached ones are not)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path, settings: EngineSettings) -> Engine:
        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        device = resolve_device(settings.device)
        model = load_model(checkpoint_dir, device, resolve_dtype(settings.dtype, device))
        return cls(model, TextTokenizer.from_directory(checkpoint_dir), settings)

    # ---- called from any thread -------------------------------------------------------------------

    def add_request(self, generation: GenerationRequest) -> Request:
        """Validate and queue; raises InvalidRequest (bad input) or WaitingQueueFull at once.

        Every check, and everything that can fail (the generator for `seed`), happens before the
        scheduler sees the request, and nothing that can fail comes after: a refused request leaves
        nothing behind, and its id can be used again.
        """
        if not isinstance(generation.request_id, str) or not generation.request_id:
            raise InvalidRequest("request_id must be a non-empty string")
        prompt_token_ids = self._prompt_token_ids(generation)
        sampling = self._sampling_params(generation, len(prompt_token_ids))
        tier_level = (
            self.settings.tier_levels.get(generation.tier) if isinstance(generation.tier, str) else None
        )
        if tier_level is None:
            raise InvalidRequest(
                f"tier {generation.tier!r} is not one of {sorted(self.settings.tier_levels)}"
            )
        generator = None if sampling.greedy else _generator_for(sampling.seed)
        detokenizer = IncrementalDetokenizer(self.tokenizer, sampling.stop)
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
            self.scheduler.add_request(request)  # raises WaitingQueueFull (nothing added)
            self._detokenizers[request.request_id] = detokenizer
            if generator is not None:
                self._generators[request.request_id] = generator
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
        """One step; never raises for a request's problem (that request finishes with ERROR)."""
        with self._lock:
            outputs = self._apply_aborts()
            scheduler_output = self.scheduler.schedule()
            now_ms = self._clock_ms()
            for chunk in scheduler_output.chunks:  # the queue time of the requests scheduled the first time
                if chunk.request.queued_ms is None:
                    chunk.request.queued_ms = now_ms - chunk.request.arrival_ms
        executed = self._execute(scheduler_output) if scheduler_output.chunks else _Executed({}, {}, None)
        with self._lock:
            outputs += self._update(scheduler_output, executed)
            outputs += self._apply_aborts()
            self.last_step_stats = StepStats(
                scheduled_sequences=len(scheduler_output.chunks),
                scheduled_tokens=scheduler_output.total_num_scheduled_tokens,
                generated_tokens=len(executed.sampled),
                waiting=len(self.scheduler.waiting),
                running=len(self.scheduler.running),
                kv_cache_usage=self.scheduler.kv_cache_usage(),
                preempted=len(scheduler_output.preempted),
            )
            self.computed_tokens_total += scheduler_output.total_num_scheduled_tokens
        return outputs

    @torch.inference_mode()
    def _execute(self, scheduler_output: SchedulerOutput) -> _Executed:
        chunks = scheduler_output.chunks
        try:
            batch = PagedBatch.build(
                block_tables=[self.scheduler.kv.block_table(chunk.request.request_id) for chunk in chunks],
                starts=[chunk.start for chunk in chunks],
                chunks=[chunk.token_ids for chunk in chunks],
                block_tokens=self.cache.block_tokens,
                device=self.device,
                dtype=self.dtype,
            )
            logits = self.model.forward_packed(batch, self.cache)  # (S, vocab)
            rows = [i for i, chunk in enumerate(chunks) if chunk.completes_sequence]
            if not rows:
                return _Executed({}, {}, None)
            requests = [chunks[i].request for i in rows]
            row_index = torch.tensor(rows, dtype=torch.long, device=self.device)
            logits = logits.index_select(0, row_index)[
                :, : self.tokenizer.vocab_size
            ]  # padded vocab never sampled
            results = sample_next_tokens(
                logits,
                [request.sampling for request in requests],
                [self._generators.get(request.request_id) for request in requests],
                [request.output_token_ids for request in requests],
            )
        except Exception as error:  # noqa: BLE001 - the batch failed: no one request is to blame
            return _Executed({}, {}, f"the engine step failed: {type(error).__name__}: {error}")
        sampled = {
            r.request_id: x for r, x in zip(requests, results, strict=True) if isinstance(x, SampledToken)
        }
        failed = {
            r.request_id: x.error for r, x in zip(requests, results, strict=True) if isinstance(x, RowFailure)
        }
        return _Executed(sampled, failed, None)

    def _update(self, scheduler_output: SchedulerOutput, executed: _Executed) -> list[RequestOutput]:
        if executed.batch_error is not None:
            scheduled_ids = [chunk.request.request_id for chunk in scheduler_output.chunks]
            failed = self.scheduler.finish_requests(scheduled_ids, FinishReason.ERROR, executed.batch_error)
            return [self._output(request, sampled=None, text="") for request in failed]
        token_ids = {request_id: token.token_id for request_id, token in executed.sampled.items()}
        advanced = self.scheduler.update_from_output(scheduler_output, token_ids, executed.failed)
        outputs = [
            self._advanced_output(request, executed.sampled[request.request_id]) for request in advanced
        ]
        for chunk in scheduler_output.chunks:
            request = chunk.request
            if request.request_id in executed.failed and request.finish_reason is FinishReason.ERROR:
                outputs.append(self._output(request, sampled=None, text=""))
        return outputs

    def _advanced_output(self, request: Request, sampled: SampledToken) -> RequestOutput:
        """The output for a request that received a token; a failure here fails this request only."""
        try:
            detokenizer = self._detokenizers[request.request_id]
            text = detokenizer.push(sampled.token_id)
            if detokenizer.stopped:
                if request.finish_reason is None:
                    self.scheduler.finish_requests([request.request_id], FinishReason.STOP)
                else:
                    request.finish_reason = FinishReason.STOP  # the stop text came with the last token
            elif request.finish_reason is not None:
                text += detokenizer.flush()
            return self._output(request, sampled=sampled, text=text)
        except Exception as error:  # noqa: BLE001 - one request's output failed: only it ends
            message = f"building the output failed: {type(error).__name__}: {error}"
            if request.finish_reason is None:
                self.scheduler.finish_requests([request.request_id], FinishReason.ERROR, message)
            else:  # already finished (and its blocks freed) by this token
                request.finish_reason, request.error = FinishReason.ERROR, message
            return self._output(request, sampled=None, text="")

    def _apply_aborts(self) -> list[RequestOutput]:
        if not self._pending_aborts:
            return []
        cancelled = self.scheduler.finish_requests(sorted(self._pending_aborts), FinishReason.CANCELLED)
        self._pending_aborts.clear()
        return [self._output(request, sampled=None, text="") for request in cancelled]

    def _output(self, request: Request, sampled: SampledToken | None, text: str) -> RequestOutput:
        if request.finish_reason is not None:
            self._detokenizers.pop(request.request_id, None)
            self._generators.pop(request.request_id, None)
        logprob, top_logprobs = None, ()
        if sampled is not None and sampled.logprob is not None:
            logprob = self._token_logprob(sampled.token_id, sampled.logprob)
            top_logprobs = tuple(
                self._token_logprob(token_id, value) for token_id, value in sampled.top_logprobs
            )
        return RequestOutput(
            request_id=request.request_id,
            token_id=None if sampled is None else sampled.token_id,
            text=text,
            finish_reason=request.finish_reason,
            prompt_tokens=request.prompt_tokens_processed,
            completion_tokens=request.completion_tokens,
            logprob=logprob,
            top_logprobs=top_logprobs,
            error=request.error,
            cached_prompt_tokens=request.cached_prompt_tokens,
            queued_ms=request.queued_ms,
        )

    def _token_logprob(self, token_id: int, logprob: float) -> TokenLogprob:
        token_bytes = self.tokenizer.token_bytes(token_id)
        return TokenLogprob(
            token_id=token_id,
            token=token_bytes.decode("utf-8", errors="replace"),
            bytes=tuple(token_bytes),
            logprob=logprob,
        )

    # ---- validation -------------------------------------------------------------------------------

    def _prompt_token_ids(self, generation: GenerationRequest) -> list[int]:
        if (generation.prompt is None) == (generation.prompt_token_ids is None):
            raise InvalidRequest("give exactly one of prompt or prompt_token_ids")
        if generation.prompt is not None:
            if not isinstance(generation.prompt, str):
                raise InvalidRequest("prompt must be a string")
            token_ids = self.tokenizer.encode(generation.prompt)
        else:
            token_ids = list(generation.prompt_token_ids)
            vocab_size = self.tokenizer.vocab_size
            if any(not _is_integer(token_id) or not 0 <= token_id < vocab_size for token_id in token_ids):
                raise InvalidRequest(f"prompt_token_ids must be in 0..{vocab_size - 1}")
        if not token_ids:
            raise InvalidRequest("prompt is empty: it must hold at least one token")
        return token_ids

    def _sampling_params(self, generation: GenerationRequest, prompt_tokens: int) -> SamplingParams:
        context_max = self.settings.context_tokens_max
        if not _is_integer(generation.max_tokens) or generation.max_tokens < 1:
            raise InvalidRequest("max_tokens must be an integer of at least 1")
        if prompt_tokens + generation.max_tokens > context_max:
            raise InvalidRequest(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({generation.max_tokens}) exceeds the context of {context_max} tokens"  # noqa: E501
            )
        temperature = _number_in("temperature", generation.temperature, 0.0, TEMPERATURE_MAX)
        top_p = _number_in("top_p", generation.top_p, 0.0, 1.0)
        if top_p == 0.0:
            raise InvalidRequest("top_p must be in (0, 1]")
        seed = generation.seed
        if seed is not None and (not _is_integer(seed) or not SEED_MIN <= seed <= SEED_MAX):
            raise InvalidRequest(f"seed must be an integer in {SEED_MIN}..{SEED_MAX}")
        return SamplingParams(
            max_tokens=generation.max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=self._stop(generation.stop),
            logprobs=self._logprobs(generation),
            top_logprobs=generation.top_logprobs,
            logit_bias=self._logit_bias(generation.logit_bias),
            presence_penalty=_number_in(
                "presence_penalty", generation.presence_penalty, -PENALTY_MAX, PENALTY_MAX
            ),
            frequency_penalty=_number_in(
                "frequency_penalty", generation.frequency_penalty, -PENALTY_MAX, PENALTY_MAX
            ),
        )

    def _stop(self, stop: tuple[str, ...]) -> tuple[str, ...]:
        if isinstance(stop, str) or not isinstance(stop, tuple | list):
            raise InvalidRequest("stop must be a list of strings")
        if len(stop) > self.settings.stop_sequences_max:
            raise InvalidRequest(f"stop holds at most {self.settings.stop_sequences_max} sequences")
        chars_max = self.settings.stop_sequence_chars_max
        if any(not isinstance(s, str) or not 0 < len(s) <= chars_max for s in stop):
            raise InvalidRequest(f"each stop sequence must be 1..{chars_max} characters")
        return tuple(stop)

    @staticmethod
    def _logprobs(generation: GenerationRequest) -> bool:
        if not isinstance(generation.logprobs, bool):
            raise InvalidRequest("logprobs must be true or false")
        top = generation.top_logprobs
        if not _is_integer(top) or not 0 <= top <= TOP_LOGPROBS_MAX:
            raise InvalidRequest(f"top_logprobs must be an integer in 0..{TOP_LOGPROBS_MAX}")
        if top > 0 and not generation.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs set to true")
        return generation.logprobs

    def _logit_bias(self, logit_bias: dict[int, float] | None) -> tuple[tuple[int, float], ...]:
        if logit_bias is None:
            return ()
        if not isinstance(logit_bias, dict):
            raise InvalidRequest("logit_bias must map token ids to numbers")
        if len(logit_bias) > LOGIT_BIAS_ENTRIES_MAX:
            raise InvalidRequest(f"logit_bias holds at most {LOGIT_BIAS_ENTRIES_MAX} token ids")
        vocab_size = self.tokenizer.vocab_size
        if any(not _is_integer(token_id) or not 0 <= token_id < vocab_size for token_id in logit_bias):
            raise InvalidRequest(f"logit_bias token ids must be in 0..{vocab_size - 1}")
        return tuple(
            sorted(
                (token_id, _number_in("logit_bias", bias, -LOGIT_BIAS_MAX, LOGIT_BIAS_MAX))
                for token_id, bias in logit_bias.items()
            )
        )


@dataclass(frozen=True)
class _Executed:
    """What the model and the sampler made of one step's batch."""

    sampled: dict[str, SampledToken]  # request id -> its new token
    failed: dict[str, str]  # request id -> why its token could not be chosen
    batch_error: str | None  # the batch itself failed: every scheduled request fails with this


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number_in(field: str, value: object, low: float, high: float) -> float:
    """`value` as a float when it is a finite number in [low, high]; otherwise InvalidRequest naming the
    field."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{field} must be a number")
    try:
        number = float(value)
    except OverflowError:
        raise InvalidRequest(f"{field} must be in {low}..{high}") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise InvalidRequest(f"{field} must be in {low}..{high}")
    return number


def _generator_for(seed: int | None) -> torch.Generator:
    try:
        return new_generator(seed)
    except (ValueError, RuntimeError, OverflowError, TypeError) as error:
        raise InvalidRequest(f"seed {seed} cannot seed the sampler: {error}") from error
