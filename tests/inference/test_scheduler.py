"""Scheduler and queue policy: token budget, chunked prefill, running cap, queue limit, priority and aging."""

from __future__ import annotations

import pytest

from inference.kv_cache_manager import KVCacheManager
from inference.queue_policy import FcfsQueue, PriorityAgingQueue, create_waiting_queue
from inference.request import FinishReason, Request, SamplingParams, WaitingQueueFull
from inference.scheduler import Scheduler


def make_request(
    request_id: str, prompt_tokens: int, tier_level: int = 0, arrival_ms: int = 0, max_tokens: int = 8
) -> Request:
    make_request.arrivals += 1
    return Request(
        request_id=request_id,
        prompt_token_ids=[1] * prompt_tokens,
        sampling=SamplingParams(max_tokens=max_tokens),
        tier_level=tier_level,
        arrival_ms=arrival_ms,
        arrival_index=make_request.arrivals,
    )


make_request.arrivals = 0


def make_scheduler(
    running_max=4,
    step_tokens_max=16,
    chunk_max=8,
    depth_max=8,
    policy="fcfs",
    block_count=128,
    block_tokens=4,
    prefix_caching=False,
    context_max=64,
) -> Scheduler:
    return Scheduler(
        waiting=create_waiting_queue(policy, aging_ms_per_tier_level=1000),
        kv=KVCacheManager(block_count, block_tokens, prefix_caching),
        running_sequences_max=running_max,
        step_tokens_max=step_tokens_max,
        prefill_chunk_tokens_max=chunk_max,
        waiting_queue_depth_max=depth_max,
        context_tokens_max=context_max,
        eos_token_id=None,
    )


def sample_for_completed(scheduler: Scheduler, output) -> dict[str, int]:
    return {chunk.request.request_id: 2 for chunk in output.chunks if chunk.completes_sequence}


def test_long_prompt_is_chunked_while_a_short_one_keeps_decoding():
    scheduler = make_scheduler(step_tokens_max=10, chunk_max=8)
    scheduler.add_request(make_request("short", prompt_tokens=2, max_tokens=20))
    output = scheduler.schedule()
    scheduler.update_from_output(output, sample_for_completed(scheduler, output))
    scheduler.add_request(make_request("long", prompt_tokens=30))
    fed_per_step = []
    for _ in range(4):
        output = scheduler.schedule()
        fed = {chunk.request.request_id: len(chunk.token_ids) for chunk in output.chunks}
        fed_per_step.append(fed)
        assert output.total_num_scheduled_tokens <= 10
        scheduler.update_from_output(output, sample_for_completed(scheduler, output))
    # The short request decodes every step; the long prompt advances by at most one chunk per step.
    assert [fed["short"] for fed in fed_per_step] == [1, 1, 1, 1]
    assert [fed["long"] for fed in fed_per_step] == [8, 8, 8, 6]
    assert scheduler.requests["long"].completion_tokens == 1


def test_prompts_in_prefill_never_stall_running_decodes():
    scheduler = make_scheduler(running_max=4, step_tokens_max=16, chunk_max=8)
    for request_id in ("short-1", "short-2"):
        scheduler.add_request(make_request(request_id, prompt_tokens=1, max_tokens=20))
    output = scheduler.schedule()
    scheduler.update_from_output(output, sample_for_completed(scheduler, output))
    for request_id in ("long-1", "long-2"):
        scheduler.add_request(make_request(request_id, prompt_tokens=60, max_tokens=4))
    for _ in range(6):
        output = scheduler.schedule()
        fed = {chunk.request.request_id: len(chunk.token_ids) for chunk in output.chunks}
        assert fed["short-1"] == fed["short-2"] == 1  # the decodes advance every step
        assert output.total_num_scheduled_tokens == 16  # the long prompts take the rest of the budget
        assert sum(fed.get(r, 0) for r in ("long-1", "long-2")) == 14
        scheduler.update_from_output(output, sample_for_completed(scheduler, output))


def test_running_sequences_are_capped_and_the_rest_wait():
    scheduler = make_scheduler(running_max=2, step_tokens_max=16)
    for index in range(5):
        scheduler.add_request(make_request(f"r{index}", prompt_tokens=2))
    output = scheduler.schedule()
    assert [chunk.request.request_id for chunk in output.chunks] == ["r0", "r1"]
    assert len(scheduler.running) == 2 and len(scheduler.waiting) == 3
    assert [scheduler.kv.holds_blocks(f"r{i}") for i in range(3)] == [True, True, False]


def test_full_waiting_queue_refuses_at_once():
    scheduler = make_scheduler(depth_max=2)
    scheduler.add_request(make_request("a", prompt_tokens=1))
    scheduler.add_request(make_request("b", prompt_tokens=1))
    with pytest.raises(WaitingQueueFull, match="waiting queue is full"):
        scheduler.add_request(make_request("c", prompt_tokens=1))
    assert set(scheduler.requests) == {"a", "b"}


def test_finishing_a_running_request_frees_its_blocks_for_a_waiting_one():
    scheduler = make_scheduler(running_max=1)
    scheduler.add_request(make_request("first", prompt_tokens=2))
    scheduler.add_request(make_request("second", prompt_tokens=2))
    scheduler.schedule()
    finished = scheduler.finish_requests(["first"], FinishReason.CANCELLED)
    assert [request.request_id for request in finished] == ["first"]
    assert not scheduler.kv.holds_blocks("first") and scheduler.kv.usage() == 0.0
    output = scheduler.schedule()
    assert [chunk.request.request_id for chunk in output.chunks] == ["second"]


def test_a_request_whose_token_failed_finishes_with_error_and_frees_its_blocks_the_others_go_on():
    scheduler = make_scheduler(running_max=2, step_tokens_max=16, chunk_max=8)
    for request_id in ("ok", "failing", "waiting"):
        scheduler.add_request(make_request(request_id, prompt_tokens=3))
    output = scheduler.schedule()
    failing = scheduler.requests["failing"]
    sampled = {"ok": 2}
    advanced = scheduler.update_from_output(output, sampled, failed={"failing": "sampling failed: boom"})
    assert [request.request_id for request in advanced] == ["ok"]
    assert (failing.finish_reason, failing.error) == (FinishReason.ERROR, "sampling failed: boom")
    assert (
        failing.num_computed_tokens == 3 and failing.completion_tokens == 0
    )  # its prompt went through the model
    assert set(scheduler.requests) == {"ok", "waiting"} and not scheduler.kv.holds_blocks("failing")
    admitted = scheduler.schedule()
    assert {chunk.request.request_id for chunk in admitted.chunks} == {"ok", "waiting"}


def test_finishing_with_error_needs_a_reason_and_only_error_carries_one():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", prompt_tokens=2))
    scheduler.add_request(make_request("b", prompt_tokens=2))
    with pytest.raises(AssertionError):
        scheduler.finish_requests(["a"], FinishReason.ERROR)
    with pytest.raises(AssertionError):
        scheduler.finish_requests(["a"], FinishReason.CANCELLED, error="why")
    [failed] = scheduler.finish_requests(["a"], FinishReason.ERROR, error="the batch failed")
    [cancelled] = scheduler.finish_requests(["b"], FinishReason.CANCELLED)
    assert (failed.finish_reason, failed.error) == (FinishReason.ERROR, "the batch failed")
    assert (cancelled.finish_reason, cancelled.error) == (FinishReason.CANCELLED, None)
    assert not scheduler.has_unfinished_requests()


def test_max_tokens_finishes_with_length():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("r", prompt_tokens=3, max_tokens=2))
    for _ in range(2):
        output = scheduler.schedule()
        scheduler.update_from_output(output, sample_for_completed(scheduler, output))
    assert not scheduler.has_unfinished_requests() and scheduler.kv.usage() == 0.0


def test_fcfs_keeps_arrival_order_whatever_the_tier():
    queue = FcfsQueue()
    for request in [make_request("free", 1, tier_level=3), make_request("enterprise", 1, tier_level=0)]:
        queue.add(request)
    assert [queue.pop().request_id for _ in range(2)] == ["free", "enterprise"]


def test_priority_serves_a_higher_tier_first():
    queue = PriorityAgingQueue(aging_ms_per_tier_level=1000)
    queue.add(make_request("free", 1, tier_level=3, arrival_ms=0))
    queue.add(make_request("pro", 1, tier_level=1, arrival_ms=10))
    queue.add(make_request("enterprise", 1, tier_level=0, arrival_ms=20))
    assert [queue.pop().request_id for _ in range(3)] == ["enterprise", "pro", "free"]


def test_aging_lets_a_low_tier_through_a_steady_stream_of_high_tier_arrivals():
    """A free request (3 levels down, 1000 ms per level) waits behind enterprise arrivals for 3 s, no
    longer."""

    queue = PriorityAgingQueue(aging_ms_per_tier_level=1000)
    queue.add(make_request("free", 1, tier_level=3, arrival_ms=0))
    served_before_free = []
    for now_ms in range(0, 10_000, 100):  # one enterprise arrival and one admission every 100 ms
        queue.add(make_request(f"enterprise-{now_ms}", 1, tier_level=0, arrival_ms=now_ms))
        served = queue.pop()
        if served.request_id == "free":
            break
        served_before_free.append(served)
    else:
        pytest.fail("the free request was starved")
    assert served_before_free, "the free request must be delayed behind the enterprise tier"
    assert max(request.arrival_ms for request in served_before_free) <= 3000


def test_priority_policy_admits_by_tier_in_the_scheduler():
    scheduler = make_scheduler(running_max=1, policy="priority")
    scheduler.add_request(make_request("free", 1, tier_level=3, arrival_ms=0))
    scheduler.add_request(make_request("enterprise", 1, tier_level=0, arrival_ms=5))
    output = scheduler.schedule()
    assert [chunk.request.request_id for chunk in output.chunks] == ["enterprise"]


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown queue policy"):
        create_waiting_queue("lifo", aging_ms_per_tier_level=1000)
