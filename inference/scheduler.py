"""Continuous batching in the shape of vLLM v1's scheduler.

State lives in three containers: `requests` (every unfinished request by id), `waiting` (a queue
policy) and `running` (a list, in admission order). Each `schedule()` hands out a token budget:
running decodes first (one token each; the budget always covers them), then running prompts still in
prefill (their next chunk, at most `prefill_chunk_tokens_max`), then waiting requests are admitted while
there is budget, a running
place and a free KV cache slot. A long prompt therefore advances chunk by chunk while the others keep
decoding. `update_from_output` applies the sampled tokens and finishes requests that reached
max_tokens or the end-of-text token (and, with ERROR, those whose token could not be chosen);
`finish_requests` removes requests (cancel, stop string, a failure) and frees their cache slot at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference.model import KVCache
from inference.queue_policy import WaitingQueue
from inference.request import FinishReason, Request, RequestStatus, WaitingQueueFull


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    start: int  # cache position of the first token fed
    token_ids: list[int]

    @property
    def completes_sequence(self) -> bool:
        """True when this chunk reaches the last known token, so its logits give the next token."""
        return self.start + len(self.token_ids) == self.request.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    total_num_scheduled_tokens: int


class Scheduler:
    def __init__(
        self,
        waiting: WaitingQueue,
        cache: KVCache,
        running_sequences_max: int,
        step_tokens_max: int,
        prefill_chunk_tokens_max: int,
        waiting_queue_depth_max: int,
        eos_token_id: int | None,
    ) -> None:
        assert running_sequences_max <= cache.slot_count, "each running sequence needs its own cache slot"
        assert step_tokens_max >= running_sequences_max, (
            "the budget must cover one decode token per running sequence"
        )
        self.requests: dict[str, Request] = {}
        self.waiting = waiting
        self.running: list[Request] = []
        self.cache = cache
        self.running_sequences_max = running_sequences_max
        self.step_tokens_max = step_tokens_max
        self.prefill_chunk_tokens_max = prefill_chunk_tokens_max
        self.waiting_queue_depth_max = waiting_queue_depth_max
        self.eos_token_id = eos_token_id

    def add_request(self, request: Request) -> None:
        assert request.request_id not in self.requests, f"request {request.request_id} added twice"
        assert request.num_prompt_tokens + request.sampling.max_tokens <= self.cache.context_tokens_max, (
            "request exceeds the cache context; the engine validates this before adding"
        )
        if len(self.waiting) >= self.waiting_queue_depth_max:
            raise WaitingQueueFull(f"waiting queue is full ({self.waiting_queue_depth_max} requests)")
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def schedule(self) -> SchedulerOutput:
        token_budget = self.step_tokens_max
        chunks: list[ScheduledChunk] = []
        # Decodes first: the budget covers one token per running sequence, so no prefill can stall them.
        decoding = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefilling = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        for request in decoding + prefilling:
            if token_budget == 0:
                break
            chunk = self._next_chunk(request, token_budget)
            chunks.append(chunk)
            token_budget -= len(chunk.token_ids)

        while (
            self.waiting
            and token_budget > 0
            and len(self.running) < self.running_sequences_max
            and self.cache.free_slot_count > 0
        ):
            request = self.waiting.pop()
            request.slot = self.cache.allocate()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chunk = self._next_chunk(request, token_budget)
            chunks.append(chunk)
            token_budget -= len(chunk.token_ids)

        total = sum(len(chunk.token_ids) for chunk in chunks)
        assert total == self.step_tokens_max - token_budget, "budget accounting drifted"
        assert total <= self.step_tokens_max, (
            f"scheduled {total} tokens over the budget {self.step_tokens_max}"
        )
        assert len(self.running) <= self.running_sequences_max, "too many running sequences"
        assert len({chunk.request.slot for chunk in chunks}) == len(chunks), "two chunks share a cache slot"
        return SchedulerOutput(chunks=chunks, total_num_scheduled_tokens=total)

    def _next_chunk(self, request: Request, token_budget: int) -> ScheduledChunk:
        pending = request.num_tokens - request.num_computed_tokens
        assert pending > 0, f"running request {request.request_id} has nothing to compute"
        count = min(pending, token_budget, self.prefill_chunk_tokens_max)
        start = request.num_computed_tokens
        return ScheduledChunk(request=request, start=start, token_ids=request.token_slice(start, count))

    def update_from_output(
        self,
        output: SchedulerOutput,
        sampled_token_ids: dict[str, int],
        failed: dict[str, str] | None = None,
    ) -> list[Request]:
        """Advance the scheduled requests; returns those that received a new token (finished or not).

        `failed` (request id -> why) are requests whose chunk went through the model but whose next
        token could not be chosen: they finish with ERROR and free their slot; the others go on.
        """
        failed = failed or {}
        advanced = []
        finished_ids = []
        for chunk in output.chunks:
            request = chunk.request
            if request.status is not RequestStatus.RUNNING:
                continue  # finished while the step ran (cancelled); its slot is already free
            request.num_computed_tokens += len(chunk.token_ids)
            if request.request_id in failed:
                request.finish_reason = FinishReason.ERROR
                request.error = failed[request.request_id]
                finished_ids.append(request.request_id)
                continue
            token_id = sampled_token_ids.get(request.request_id)
            if token_id is None:
                assert not chunk.completes_sequence, f"request {request.request_id} completed without a token"
                continue
            request.output_token_ids.append(token_id)
            advanced.append(request)
            if token_id == self.eos_token_id:
                request.finish_reason = FinishReason.STOP
                finished_ids.append(request.request_id)
            elif request.completion_tokens >= request.sampling.max_tokens:
                request.finish_reason = FinishReason.LENGTH
                finished_ids.append(request.request_id)
        self._remove(finished_ids)
        return advanced

    def finish_requests(
        self, request_ids: list[str], reason: FinishReason, error: str | None = None
    ) -> list[Request]:
        """Finish unfinished requests (unknown or finished ids are ignored); frees their slots now."""
        assert (reason is FinishReason.ERROR) == (error is not None), "an error, and only an error, says why"
        finishing = [self.requests[rid] for rid in request_ids if rid in self.requests]
        for request in finishing:
            request.finish_reason = reason
            request.error = error
        self._remove([request.request_id for request in finishing])
        return finishing

    def _remove(self, request_ids: list[str]) -> None:
        if not request_ids:
            return
        ids = set(request_ids)
        self.waiting.remove(ids)
        for request in self.running:
            if request.request_id in ids:
                self.cache.release(request.slot)
                request.slot = None
        self.running = [request for request in self.running if request.request_id not in ids]
        for request_id in ids:
            request = self.requests.pop(request_id)
            request.status = RequestStatus.FINISHED
            assert request.finish_reason is not None, f"request {request_id} finished without a reason"
