"""The paged KV cache: attention through block tables (against the slot cache and the longhand Hugging Face
GPT-2 reference), the block pool (reference counts, prefix hashes, LRU eviction), admission by the step,
prefix caching in the engine, and preemption with a tiny pool."""

from __future__ import annotations

import json

import pytest
import torch

from inference.block_pool import ROOT_BLOCK_HASH, BlockPool, block_hash
from inference.engine import Engine, GenerationRequest
from inference.metrics import WorkerMetrics
from inference.model import GPT, GPTConfig, KVCache, PackedBatch, load_checkpoint, write_safetensors
from inference.paged_attention import PagedBatch, PagedKVCache
from inference.request import FinishReason, RequestStatus
from tests.inference.conftest import completion_token_ids, engine_settings, run_to_completion
from tests.inference.test_model import CONFIG, random_gpt2_tensors, reference_logits
from tests.inference.test_scheduler import make_request, make_scheduler

# Three sequences fed over two steps: chunks next to decodes, positions resuming where the cache left off.
SEQUENCES = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [40, 41, 42, 43, 44], "c": [1, 2, 3]}
STEPS = [{"a": (0, 4), "c": (0, 2)}, {"a": (4, 3), "c": (2, 1), "b": (0, 5)}]
# Blocks of 2 tokens handed out out of order, so a sequence's keys are not contiguous in the cache.
BLOCK_TABLES = {"a": [7, 2, 5, 0], "b": [1, 6, 3], "c": [4, 8]}


def paged_logits(model, config, device: torch.device, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    cache = PagedKVCache(
        config, block_count=9, block_tokens=2, context_tokens_max=64, device=device, dtype=dtype
    )
    results = []
    with torch.inference_mode():
        for plan in STEPS:
            names = list(plan)
            batch = PagedBatch.build(
                block_tables=[BLOCK_TABLES[name] for name in names],
                starts=[plan[name][0] for name in names],
                chunks=[SEQUENCES[name][plan[name][0] : sum(plan[name])] for name in names],
                block_tokens=2,
                device=device,
                dtype=dtype,
            )
            logits = model.forward_packed(batch, cache)
            results.append({name: logits[row] for row, name in enumerate(names)})
    return results


def slot_logits(model, config, device: torch.device, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    cache = KVCache(config, slot_count=3, context_tokens_max=64, device=device, dtype=dtype)
    slots = {"a": 0, "b": 1, "c": 2}
    results = []
    with torch.inference_mode():
        for plan in STEPS:
            names = list(plan)
            batch = PackedBatch.build(
                slots=[slots[name] for name in names],
                starts=[plan[name][0] for name in names],
                chunks=[SEQUENCES[name][plan[name][0] : sum(plan[name])] for name in names],
                device=device,
                dtype=dtype,
            )
            logits = model.forward_packed(batch, cache)
            results.append({name: logits[row] for row, name in enumerate(names)})
    return results


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_paged_attention_matches_the_slot_cache_and_the_hugging_face_reference(tmp_path, device):
    tensors = random_gpt2_tensors(seed=11)
    write_safetensors(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    model = load_checkpoint(tmp_path, torch.device(device), torch.float64)
    config = model.config
    paged = paged_logits(model, config, torch.device(device), torch.float64)
    slot = slot_logits(model, config, torch.device(device), torch.float64)
    reference_tensors = {k: v.double() for k, v in tensors.items()}
    for plan, paged_step, slot_step in zip(STEPS, paged, slot, strict=True):
        for name, (start, count) in plan.items():
            torch.testing.assert_close(paged_step[name], slot_step[name], rtol=1e-10, atol=1e-10)
            expected = reference_logits(reference_tensors, SEQUENCES[name][: start + count])[-1]
            torch.testing.assert_close(paged_step[name].cpu(), expected, rtol=1e-9, atol=1e-9)


def test_paged_cache_memory_is_the_blocks_it_holds():
    config = GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=16)
    cache = PagedKVCache(config, 10, 4, 64, torch.device("cpu"), torch.float32)
    assert (
        cache.bytes_total
        == 10 * 4 * PagedKVCache.bytes_per_token(config, torch.float32)
        == 10 * 4 * 2 * 2 * 16 * 4
    )


# ---- the block pool ------------------------------------------------------------------------------


def test_block_hash_chains_the_prefix():
    first = block_hash(ROOT_BLOCK_HASH, [1, 2])
    assert block_hash(first, [3, 4]) == block_hash(block_hash(ROOT_BLOCK_HASH, [1, 2]), [3, 4])
    assert block_hash(first, [3, 4]) != block_hash(block_hash(ROOT_BLOCK_HASH, [9, 2]), [3, 4])
    assert block_hash(ROOT_BLOCK_HASH, [1, 2]) != block_hash(ROOT_BLOCK_HASH, [2, 1])


def test_freed_cached_blocks_are_reused_by_reference_and_evicted_least_recently_freed_first():
    pool = BlockPool(3, caching=True)
    a, b, c = pool.take_new(3)
    pool.cache(a, b"A")
    pool.cache(b, b"B")
    pool.release([b, a, c])  # b freed first: the first evicted among the cached ones
    assert pool.free_block_count == 3 and pool.usage() == 0.0
    assert pool.cached_block(b"A") == a
    pool.touch([a])  # a prefix hit takes a back from the free queue
    assert pool.ref_count(a) == 1 and pool.free_block_count == 2
    pool.touch([a])
    assert pool.ref_count(a) == 2
    [fresh] = pool.take_new(1)
    assert fresh == b and pool.cached_block(b"B") is None  # evicted: its hash is forgotten
    assert pool.cached_block(b"A") == a  # still referenced, still cached
    pool.release([a, a, fresh])
    assert pool.ref_count(a) == 0 and pool.cached_block(b"A") == a


# ---- admission and preemption in the scheduler -------------------------------------------------------


def test_admission_needs_blocks_for_the_next_step_not_a_whole_context():
    # 8 blocks of 4 tokens = 32 tokens: a whole context (32) each would admit one request; the first
    # chunk of each (3 prompt tokens: one block) admits all four.
    scheduler = make_scheduler(running_max=4, block_count=8, block_tokens=4, context_max=32)
    for index in range(4):
        scheduler.add_request(make_request(f"r{index}", prompt_tokens=3, max_tokens=29))
    output = scheduler.schedule()
    assert len(output.chunks) == 4 and len(scheduler.running) == 4
    assert scheduler.kv.usage() == 0.5


def decode_all(scheduler, steps: int) -> list[list[str]]:
    preempted = []
    for _ in range(steps):
        output = scheduler.schedule()
        preempted.append(output.preempted)
        sampled = {c.request.request_id: 2 for c in output.chunks if c.completes_sequence}
        scheduler.update_from_output(output, sampled)
        if not scheduler.has_unfinished_requests():
            break
    return preempted


def test_a_full_pool_preempts_the_lowest_priority_most_recent_request_and_it_recomputes():
    scheduler = make_scheduler(
        running_max=3,
        step_tokens_max=16,
        chunk_max=8,
        block_count=6,
        block_tokens=2,
        context_max=12,
        policy="priority",
    )
    scheduler.add_request(make_request("high-old", prompt_tokens=2, tier_level=0, max_tokens=8))
    scheduler.add_request(make_request("low", prompt_tokens=2, tier_level=2, max_tokens=8))
    scheduler.add_request(make_request("high-new", prompt_tokens=2, tier_level=0, max_tokens=8))
    preempted = decode_all(scheduler, steps=200)
    flat = [request_id for step in preempted for request_id in step]
    assert flat and flat[0] == "low"  # the lowest tier goes first, though it is not the most recent
    assert not scheduler.has_unfinished_requests()  # everyone finished: nobody failed for memory
    assert scheduler.preemptions_total == len(flat)


def test_a_preempted_request_goes_back_to_waiting_without_blocks_and_is_billed_once():
    scheduler = make_scheduler(
        running_max=2, step_tokens_max=16, chunk_max=8, block_count=4, block_tokens=2, context_max=8
    )
    scheduler.add_request(make_request("first", prompt_tokens=3, max_tokens=5))
    scheduler.add_request(make_request("second", prompt_tokens=3, max_tokens=5))
    second = scheduler.requests["second"]
    seen_waiting = False
    for _ in range(100):
        output = scheduler.schedule()
        if "second" in output.preempted:
            assert second.status is RequestStatus.WAITING and not scheduler.kv.holds_blocks("second")
            assert second.num_computed_tokens == 0 and second.prompt_tokens_processed == 3
            seen_waiting = True
        scheduler.update_from_output(
            output, {c.request.request_id: 2 for c in output.chunks if c.completes_sequence}
        )
        if not scheduler.has_unfinished_requests():
            break
    assert seen_waiting and second.preemptions >= 1
    assert (second.finish_reason, second.completion_tokens, second.prompt_tokens_processed) == (
        FinishReason.LENGTH,
        5,
        3,
    )


# ---- the engine: prefix caching and preemption -------------------------------------------------------


@pytest.fixture()
def make_engine(default_models, tokenizer):
    def make(device: str = "cpu", dtype: torch.dtype = torch.float32, **overrides) -> Engine:
        return Engine(default_models(device, dtype), tokenizer, engine_settings(device=device, **overrides))

    return make


def system_prompt(tokenizer, tokens: int) -> list[int]:
    text = "You are a careful assistant. Answer briefly and cite the license text when you can. " * 20
    ids = tokenizer.encode(text)
    assert len(ids) >= tokens
    return ids[:tokens]


def with_question(system: list[int], tokenizer, question: str) -> list[int]:
    return system + tokenizer.encode(question)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_a_shared_200_token_system_prompt_is_computed_once(make_engine, tokenizer, device):
    engine = make_engine(device, step_tokens_max=64, prefill_chunk_tokens_max=64, kv_block_tokens=16)
    system = system_prompt(tokenizer, 200)
    first = with_question(system, tokenizer, " What is a class?")
    second = with_question(system, tokenizer, " What is an object?")
    run_to_completion(engine, {0: [GenerationRequest(request_id="a", prompt_token_ids=first, max_tokens=4)]})
    computed_before = engine.computed_tokens_total
    out = run_to_completion(
        engine, {0: [GenerationRequest(request_id="b", prompt_token_ids=second, max_tokens=4)]}
    )["b"]
    shared_blocks = 200 // 16  # full blocks of the system prompt: 12, i.e. 192 tokens
    assert out[-1].cached_prompt_tokens == shared_blocks * 16
    assert out[-1].prompt_tokens == len(second)
    # Only the uncached tail of the prompt went through the model, then the 4 decodes (the last output
    # token is sampled, never fed back).
    assert engine.computed_tokens_total - computed_before == len(second) - shared_blocks * 16 + 3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_greedy_output_is_identical_with_and_without_the_prefix_cache(make_engine, tokenizer, device):
    system = system_prompt(tokenizer, 120)
    questions = [" Exceptions", " The with statement", " An object is hashable if", " GNU", " A class"]

    def run(prefix_caching: bool) -> dict[str, list[int]]:
        engine = make_engine(device, prefix_caching=prefix_caching, kv_block_tokens=8)
        arrivals = {
            3 * i: [
                GenerationRequest(
                    request_id=f"q{i}", prompt_token_ids=with_question(system, tokenizer, q), max_tokens=16
                )
            ]
            for i, q in enumerate(questions)
        }
        outputs = run_to_completion(engine, arrivals)
        cached = sum(o[-1].cached_prompt_tokens for o in outputs.values())
        assert (cached > 0) == prefix_caching
        return {request_id: completion_token_ids(o) for request_id, o in outputs.items()}

    assert run(True) == run(False)


def test_a_tiny_pool_preempts_yet_every_request_completes_as_alone_and_is_billed_once(make_engine, tokenizer):
    prompts = ["The", "A class definition", "Exceptions are", "GNU GENERAL PUBLIC LICENSE", "An object"]
    requests = [GenerationRequest(request_id=f"p{i}", prompt=p, max_tokens=40) for i, p in enumerate(prompts)]
    # 64 tokens of KV memory: one whole context, far less than five sequences of ~45 tokens.
    tiny = make_engine(kv_cache_tokens_max=64, kv_block_tokens=4, context_tokens_max=64, prefix_caching=False)
    batched = run_to_completion(tiny, {0: requests})
    assert tiny.scheduler.preemptions_total > 0
    for request in requests:
        alone = run_to_completion(make_engine(context_tokens_max=64), {0: [request]})[request.request_id]
        final = batched[request.request_id][-1]
        assert final.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
        assert completion_token_ids(batched[request.request_id]) == completion_token_ids(alone)
        # A recomputed prompt is not billed again: the counts are the request's own, once.
        assert (final.prompt_tokens, final.completion_tokens, final.cached_prompt_tokens) == (
            alone[-1].prompt_tokens,
            alone[-1].completion_tokens,
            0,
        )
    assert tiny.scheduler.kv.usage() == 0.0


def test_a_preempted_request_that_hits_the_cache_on_recompute_keeps_its_cached_count(make_engine, tokenizer):
    """Cached tokens are those served from the cache at first admission; a recompute that finds its own
    blocks still cached is not billed as cached (nor again as prompt)."""
    prompts = ["The quick brown fox jumps", "A class definition defines", "Exceptions are raised when"]
    requests = [GenerationRequest(request_id=f"c{i}", prompt=p, max_tokens=40) for i, p in enumerate(prompts)]
    tiny = make_engine(kv_cache_tokens_max=64, kv_block_tokens=4, context_tokens_max=64, prefix_caching=True)
    outputs = run_to_completion(tiny, {0: requests})
    assert tiny.scheduler.preemptions_total > 0
    for request in requests:
        final = outputs[request.request_id][-1]
        assert final.cached_prompt_tokens == 0 and final.prompt_tokens == len(
            tokenizer.encode(request.prompt)
        )


def test_kv_cache_usage_is_reported_by_each_step_and_on_the_metrics(make_engine):
    engine = make_engine(kv_cache_tokens_max=256, kv_block_tokens=16)  # 16 blocks
    engine.add_request(GenerationRequest(request_id="u", prompt="The", max_tokens=20))
    engine.step()
    assert engine.last_step_stats.kv_cache_usage == 1 / 16  # a short prompt holds one block, not a context
    metrics = WorkerMetrics(kv_cache_bytes=engine.cache.bytes_total)
    metrics.observe_step(engine.last_step_stats)
    assert metrics.registry.get_sample_value("tollgate_worker_kv_cache_usage_perc") == 1 / 16
    run_to_completion(engine, {})
    assert engine.last_step_stats.kv_cache_usage == 0.0


def test_many_decodes_of_mixed_lengths_are_grouped_and_match_the_full_forward():
    torch.manual_seed(3)
    config = GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=16)
    model = GPT(config).double().eval()
    count, block_tokens = 40, 4
    sequences = [torch.randint(0, 50, (2 + index,)).tolist() for index in range(count)]  # 2..41 tokens
    cache = PagedKVCache(config, 512, block_tokens, 64, torch.device("cpu"), torch.float64)
    tables = [list(range(index * 12, index * 12 + 12)) for index in range(count)]

    def build(starts: list[int], chunks: list[list[int]]) -> PagedBatch:
        return PagedBatch.build(tables, starts, chunks, block_tokens, torch.device("cpu"), torch.float64)

    with torch.inference_mode():
        model.forward_packed(build([0] * count, [s[:-1] for s in sequences]), cache)  # every prompt
        decode = build([len(s) - 1 for s in sequences], [s[-1:] for s in sequences])  # one token each
        assert len(decode.decodes) > 1  # grouped by context length
        logits = model.forward_packed(decode, cache)
        for row, sequence in enumerate(sequences):
            expected = model(torch.tensor([sequence]))[0, -1]
            torch.testing.assert_close(logits[row], expected, rtol=1e-10, atol=1e-10)
