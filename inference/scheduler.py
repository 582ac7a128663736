"""Continuous batching in the shape of vLLM v1's scheduler, over a paged KV cache.

State lives in three containers: `requests` (every unfinished request by id), `waiting` (a queue
policy) and `running` (a list, in admission order). Each `schedule()` hands out a token budget:
running decodes first (one token each; the budget always covers them), then running prompts still in
prefill (their next chunk, at most `prefill_chunk_tokens_max`), then waiting requests are admitted while
there is budget, a running place and free KV blocks for their first chunk. A long prompt therefore
advances chunk by chunk while the others keep decoding.

Memory: each scheduled chunk takes the KV blocks its tokens need (`inference.kv_cache_manager`). A
request admitted for the first time starts from the longest cached prefix of its prompt (those tokens
are not computed again, and are reported as cached prompt tokens). When a running request's next step
finds no free block, the scheduler preempts the running request of lowest priority, most recent first
(the waiting queue's `preemption_key`): its blocks are freed and it goes back to the waiting queue, to
be recomputed from its prompt and the tokens it already generated (vLLM v1's recompute preemption). A
running request is never failed for lack of memory: the pool holds at least one whole context.

`update_from_output` applies the sampled tokens, registers newly full blocks in the prefix cache, and
finishes requests that reached max_tokens or the end-of-text token (and, with ERROR, those whose token
could not be chosen); `finish_requests` removes requests (cancel, stop string, a failure) and frees
their blocks at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference.kv_cache_manager import KVCacheManager
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
    preempted: list[str]  # request ids preempted by this step (back in the waiting queue)


class Scheduler:
    def __init__(
        self,
        waiting: WaitingQueue,
        kv: KVCacheManager,
        running_sequences_max: int,
        step_tokens_max: int,
        prefill_chunk_tokens_max: int,
        waiting_queue_depth_max: int,
        context_tokens_max: int,
        eos_token_id: int | None,
    ) -> None:
        assert kv.tokens_total >= context_tokens_max, (
            "the KV pool must hold one whole context, so a request alone always fits"
        )
        assert step_tokens_max >= running_sequences_max, (
            "the budget must cover one decode token per running sequence"
        )
        self.requests: dict[str, Request] = {}
        self.waiting = waiting
        self.running: list[Request] = []
        self.kv = kv
        self.running_sequences_max = running_sequences_max
        self.step_tokens_max = step_tokens_max
        self.prefill_chunk_tokens_max = prefill_chunk_tokens_max
        self.waiting_queue_depth_max = waiting_queue_depth_max
        self.context_tokens_max = context_tokens_max
        self.eos_token_id = eos_token_id
        self.preemptions_total = 0

    def add_request(self, request: Request) -> None:
        assert request.request_id not in self.requests, f"request {request.request_id} added twice"
        assert request.num_prompt_tokens + request.sampling.max_tokens <= self.context_tokens_max, (
            "request exceeds the context; the engine validates this before adding"
        )
        if len(self.waiting) >= self.waiting_queue_depth_max:
            raise WaitingQueueFull(f"waiting queue is full ({self.waiting_queue_depth_max} requests)")
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def kv_cache_usage(self) -> float:
        """The fraction of KV blocks in use (vLLM's kv_cache_usage_perc, as 0..1)."""
        return self.kv.usage()

    def schedule(self) -> SchedulerOutput:
        budget = _Budget(self.step_tokens_max)
        chunks: dict[str, ScheduledChunk] = {}
        preempted: list[str] = []
        # Decodes first: the budget covers one token per running sequence, so no prefill can stall them.
        decoding = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefilling = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        for request in decoding + prefilling:
            if budget.left == 0:
                break
            if request.status is RequestStatus.RUNNING:
                self._schedule_running(request, budget, chunks, preempted)
        if not preempted:  # as vLLM: no admission in a step that had to preempt
            self._admit(budget, chunks)

        scheduled = list(chunks.values())
        total = sum(len(chunk.token_ids) for chunk in scheduled)
        assert total == self.step_tokens_max - budget.left, "budget accounting drifted"
        assert total <= self.step_tokens_max, (
            f"scheduled {total} tokens over the budget {self.step_tokens_max}"
        )
        assert len(self.running) <= self.running_sequences_max, "too many running sequences"
        assert all(chunk.request.status is RequestStatus.RUNNING for chunk in scheduled), "scheduled a waiter"
        return SchedulerOutput(chunks=scheduled, total_num_scheduled_tokens=total, preempted=preempted)

    def _schedule_running(
        self, request: Request, budget: _Budget, chunks: dict[str, ScheduledChunk], preempted: list[str]
    ) -> None:
        count = self._chunk_tokens(request, request.num_computed_tokens, budget.left)
        while not self.kv.allocate(request, count):
            victim = max(self.running, key=self.waiting.preemption_key)
            budget.left += self._preempt(victim, chunks)
            preempted.append(victim.request_id)
            if victim is request:
                return
        chunks[request.request_id] = self._chunk(request, request.num_computed_tokens, count)
        budget.left -= count

    def _admit(self, budget: _Budget, chunks: dict[str, ScheduledChunk]) -> None:
        while self.waiting and budget.left > 0 and len(self.running) < self.running_sequences_max:
            request = self.waiting.pop()
            prefix = self.kv.cached_prefix(request)
            computed = prefix.block_count * self.kv.block_tokens
            count = self._chunk_tokens(request, computed, budget.left)
            if not self.kv.allocate(request, count, prefix):
                self.waiting.requeue(request)  # not enough free blocks for its first chunk: wait
                return
            request.num_computed_tokens = computed
            if request.preemptions == 0:  # a recomputed prompt was billed in full the first time
                request.num_cached_prompt_tokens = min(computed, request.num_prompt_tokens)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chunks[request.request_id] = self._chunk(request, computed, count)
            budget.left -= count

    def _preempt(self, victim: Request, chunks: dict[str, ScheduledChunk]) -> int:
        """Free the victim's blocks and requeue it; returns the tokens it had been given this step."""
        chunk = chunks.pop(victim.request_id, None)
        self.kv.free(victim.request_id)
        self.running.remove(victim)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.WAITING
        victim.preemptions += 1
        self.preemptions_total += 1
        self.waiting.requeue(victim)
        return 0 if chunk is None else len(chunk.token_ids)

    def _chunk_tokens(self, request: Request, start: int, budget_left: int) -> int:
        pending = request.num_tokens - start
        assert pending > 0, f"request {request.request_id} has nothing to compute"
        return min(pending, budget_left, self.prefill_chunk_tokens_max)

    @staticmethod
    def _chunk(request: Request, start: int, count: int) -> ScheduledChunk:
        return ScheduledChunk(request=request, start=start, token_ids=request.token_slice(start, count))

    def update_from_output(
        self,
        output: SchedulerOutput,
        sampled_token_ids: dict[str, int],
        failed: dict[str, str] | None = None,
    ) -> list[Request]:
        """Advance the scheduled requests; returns those that received a new token (finished or not).

        `failed` (request id -> why) are requests whose chunk went through the model but whose next
        token could not be chosen: they finish with ERROR and free their blocks; the others go on.
        """
        failed = failed or {}
        advanced = []
        finished_ids = []
        for chunk in output.chunks:
            request = chunk.request
            if request.status is not RequestStatus.RUNNING:
                continue  # finished while the step ran (cancelled); its blocks are already free
            request.num_computed_tokens += len(chunk.token_ids)
            request.num_computed_tokens_max = max(
                request.num_computed_tokens_max, request.num_computed_tokens
            )
            self.kv.commit_computed(request)
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
        """Finish unfinished requests (unknown or finished ids are ignored); frees their blocks now."""
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
        for request_id in ids:
            self.kv.free(request_id)
        self.running = [request for request in self.running if request.request_id not in ids]
        for request_id in ids:
            request = self.requests.pop(request_id)
            request.status = RequestStatus.FINISHED
            assert request.finish_reason is not None, f"request {request_id} finished without a reason"


@dataclass
class _Budget:
    left: int  # tokens still to hand out this step
