"""Inference benchmark: `python -m bench.inference` prints one JSON line.

The same greedy requests (default model, mixed prompt lengths) run twice through the engine: all at once
(continuous batching over the paged KV cache) and one at a time. Reports completion tokens/s for each,
the speedup, time to first token p50/p99 (from submission; in the concurrent run every request is
submitted at t=0), and the most sequences that ran at once. The KV cache holds `--kv-cache-tokens`
tokens (default: 32 sequences x 512 tokens, the memory the slot cache had before paging).

The shared-prefix workload: `--prefix-requests` requests (default 64) that share a
`--system-prompt-tokens` system prompt (default 512), each with its own short question, all submitted at
t=0, with the prefix cache on and then off, in the same KV memory. The default model's context is 512
positions, so this workload runs a model of the default's shape with a 1024-position context (random
weights: the compute per token is the default model's). Reports time to first token p50 and total
throughput (prompt + completion tokens per second) for each.

Where `transformers` is installed, the same checkpoint also runs through its `generate`, one request at a
time and padded-batched.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from inference.engine import Engine, GenerationRequest
from inference.model import GPT, GPTConfig
from inference.settings import EngineSettings
from inference.tokenizer import DEFAULT_MODEL_DIR

SLOT_CACHE_SEQUENCES = 32  # the slot cache's sequences before paging (32 x 512 tokens of KV memory)
CONTEXT_TOKENS = 512
PREFIX_CONTEXT_TOKENS = 1024  # the shared-prefix workload's context: a 512-token prompt plus a question
QUESTION_TOKENS = 16
PREFIX_MAX_TOKENS = 16

PROMPT_SEEDS = [
    "The",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software",
    "A class definition defines a class object",
    "This program is free software; you can redistribute it and/or modify it",
    'The "with" statement is used to wrap the execution of a block',
    "Exceptions",
    "GNU GENERAL PUBLIC LICENSE",
    "An object is hashable if",
]


def build_requests(count: int, max_tokens: int) -> list[GenerationRequest]:
    requests = []
    for index in range(count):
        prompt = PROMPT_SEEDS[index % len(PROMPT_SEEDS)]
        prompt = " ".join([prompt] * (1 + index % 3))  # mixed lengths: 1x, 2x, 3x a seed
        requests.append(GenerationRequest(request_id=f"bench-{index}", prompt=prompt, max_tokens=max_tokens))
    return requests


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_engine(engine: Engine, requests: list[GenerationRequest]) -> tuple[int, float, list[float]]:
    """Submit all requests now, step to the end: (completion tokens, seconds, time to first token per
    request)."""
    completion_tokens, _, seconds, first_token_s, _ = run_engine_counting(engine, requests)
    return completion_tokens, seconds, first_token_s


def run_engine_counting(
    engine: Engine, requests: list[GenerationRequest]
) -> tuple[int, int, float, list[float], int]:
    """run_engine, also counting prompt tokens and the most sequences running at once: (completion tokens,
    prompt tokens, seconds, time to first token per request, peak running)."""
    started = time.perf_counter()
    for request in requests:
        engine.add_request(request)
    first_token_s: dict[str, float] = {}
    completion_tokens = prompt_tokens = running_peak = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        running_peak = max(running_peak, engine.last_step_stats.running)
        now = time.perf_counter()
        for output in outputs:
            if output.token_id is not None:
                first_token_s.setdefault(output.request_id, now - started)
            if output.finished:
                completion_tokens += output.completion_tokens
                prompt_tokens += output.prompt_tokens
    synchronize(engine.device)
    return (
        completion_tokens,
        prompt_tokens,
        time.perf_counter() - started,
        list(first_token_s.values()),
        running_peak,
    )


def bench_engine(engine: Engine, requests: list[GenerationRequest], rounds: int) -> dict:
    """Best of `rounds` for each mode, the modes interleaved so machine load hits both alike."""
    run_engine(engine, build_requests(2, 4))  # warm-up
    concurrent_runs, sequential_runs, running_peak = [], [], 0
    for _ in range(rounds):
        completion_tokens, _, seconds, first_token_s, peak = run_engine_counting(engine, requests)
        concurrent_runs.append((completion_tokens, seconds, first_token_s))
        running_peak = max(running_peak, peak)
        sequential = [run_engine(engine, [request]) for request in requests]
        sequential_runs.append(
            (
                sum(r[0] for r in sequential),
                sum(r[1] for r in sequential),
                [t for r in sequential for t in r[2]],
            )
        )
    concurrent_tokens, concurrent_s, concurrent_ttft = min(concurrent_runs, key=lambda run: run[1])
    sequential_tokens, sequential_s, sequential_ttft = min(sequential_runs, key=lambda run: run[1])
    assert concurrent_tokens == sequential_tokens, "greedy requests must produce the same tokens both ways"
    concurrent_rate, sequential_rate = concurrent_tokens / concurrent_s, sequential_tokens / sequential_s
    return {
        "rounds": rounds,
        "completion_tokens": concurrent_tokens,
        "concurrent_tokens_per_s": round(concurrent_rate, 1),
        "sequential_tokens_per_s": round(sequential_rate, 1),
        "speedup": round(concurrent_rate / sequential_rate, 2),
        "max_concurrent_sequences": running_peak,
        "concurrent_ttft_p50_ms": round(1000 * statistics.median(concurrent_ttft), 1),
        "concurrent_ttft_p99_ms": round(1000 * percentile(concurrent_ttft, 0.99), 1),
        "sequential_ttft_p50_ms": round(1000 * statistics.median(sequential_ttft), 1),
        "sequential_ttft_p99_ms": round(1000 * percentile(sequential_ttft, 0.99), 1),
    }


def bench_transformers(
    checkpoint_dir: Path, engine: Engine, requests: list[GenerationRequest], max_tokens: int
) -> dict:
    try:
        from transformers import GPT2LMHeadModel
    except ImportError as error:  # not installed, or installed without what it needs
        return {"skipped": f"transformers unavailable: {error}"}
    model = (
        GPT2LMHeadModel.from_pretrained(str(checkpoint_dir))
        .to(device=engine.device, dtype=engine.dtype)
        .eval()
    )
    eos = model.config.eos_token_id
    prompts = [engine.tokenizer.encode(request.prompt) for request in requests]
    common = dict(max_new_tokens=max_tokens, do_sample=False, pad_token_id=eos, eos_token_id=eos)

    def count_new(generated: torch.Tensor, prompt_width: int) -> int:
        new = generated[:, prompt_width:]
        return int(sum(row.tolist().index(eos) + 1 if eos in row.tolist() else len(row) for row in new))

    with torch.inference_mode():
        started, sequential_tokens = time.perf_counter(), 0
        for prompt in prompts:
            generated = model.generate(torch.tensor([prompt], device=engine.device), **common)
            sequential_tokens += count_new(generated, len(prompt))
        synchronize(engine.device)
        sequential_s = time.perf_counter() - started
        width = max(len(prompt) for prompt in prompts)  # left padding so every row ends at the same column
        input_ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts], device=engine.device)
        attention_mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=engine.device
        )
        started = time.perf_counter()
        generated = model.generate(input_ids, attention_mask=attention_mask, **common)
        synchronize(engine.device)
        batched_s, batched_tokens = time.perf_counter() - started, count_new(generated, width)
    return {
        "sequential_tokens_per_s": round(sequential_tokens / sequential_s, 1),
        "padded_batch_tokens_per_s": round(batched_tokens / batched_s, 1),
    }


def shared_prefix_requests(count: int, system_tokens: int, vocab_size: int) -> list[GenerationRequest]:
    """`count` requests sharing a `system_tokens` prompt prefix, each with its own question."""
    generator = torch.Generator().manual_seed(512)
    system = torch.randint(1, vocab_size, (system_tokens,), generator=generator).tolist()
    return [
        GenerationRequest(
            request_id=f"prefix-{index}",
            prompt_token_ids=system
            + torch.randint(1, vocab_size, (QUESTION_TOKENS,), generator=generator).tolist(),
            max_tokens=PREFIX_MAX_TOKENS,
        )
        for index in range(count)
    ]


def bench_shared_prefix(base: Engine, settings: EngineSettings, count: int, system_tokens: int) -> dict:
    """The shared-prefix workload with the prefix cache on and off (see the module docstring)."""
    config = GPTConfig(**{**base.model.config.__dict__, "block_size": PREFIX_CONTEXT_TOKENS})
    torch.manual_seed(0)
    model = GPT(config).to(device=base.device, dtype=base.dtype).eval()
    requests = shared_prefix_requests(count, system_tokens, base.tokenizer.vocab_size)

    def fresh_engine(caching: bool) -> Engine:
        update = {"context_tokens_max": PREFIX_CONTEXT_TOKENS, "prefix_caching": caching}
        return Engine(model, base.tokenizer, settings.model_copy(update=update))

    run_engine(fresh_engine(False), requests[:2])  # warm-up
    result: dict = {"requests": count, "system_prompt_tokens": system_tokens}
    for caching in (True, False):
        engine = fresh_engine(caching)  # an empty cache: the run's first request computes the prompt
        completion, prompt, seconds, first_token_s, peak = run_engine_counting(engine, requests)
        result["cache_on" if caching else "cache_off"] = {
            "ttft_p50_ms": round(1000 * statistics.median(first_token_s), 1),
            "total_tokens_per_s": round((prompt + completion) / seconds, 1),
            "completion_tokens_per_s": round(completion / seconds, 1),
            "computed_tokens": engine.computed_tokens_total,
            "max_concurrent_sequences": peak,
        }
    on, off = result["cache_on"], result["cache_off"]
    result["ttft_p50_speedup"] = round(off["ttft_p50_ms"] / on["ttft_p50_ms"], 2)
    result["throughput_speedup"] = round(on["total_tokens_per_s"] / off["total_tokens_per_s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs per mode")
    parser.add_argument(
        "--kv-cache-tokens", type=int, default=SLOT_CACHE_SEQUENCES * CONTEXT_TOKENS, help="KV memory"
    )
    parser.add_argument("--kv-block-tokens", type=int, default=16)
    parser.add_argument("--prefix-requests", type=int, default=64)
    parser.add_argument("--system-prompt-tokens", type=int, default=512)
    args = parser.parse_args()
    settings = EngineSettings(
        device=args.device,
        dtype=args.dtype,
        running_sequences_max=max(args.requests, args.prefix_requests),
        step_tokens_max=max(512, args.requests, args.prefix_requests),
        prefill_chunk_tokens_max=256,
        context_tokens_max=CONTEXT_TOKENS,
        kv_block_tokens=args.kv_block_tokens,
        kv_cache_tokens_max=args.kv_cache_tokens,
        waiting_queue_depth_max=max(256, args.requests, args.prefix_requests),
        torch_threads=args.threads,
    )
    engine = Engine.from_checkpoint(args.checkpoint_dir, settings)
    requests = build_requests(args.requests, args.max_tokens)
    load_before = os.getloadavg()[0]
    result = {
        "benchmark": "inference",
        "device": str(engine.device)
        if engine.device.type == "cpu"
        else torch.cuda.get_device_name(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "kv_cache_bytes": engine.cache.bytes_total,
        "kv_cache_tokens": engine.cache.block_count * engine.cache.block_tokens,
        "kv_block_tokens": engine.cache.block_tokens,
        "slot_cache_sequences": SLOT_CACHE_SEQUENCES,
        **bench_engine(engine, requests, args.rounds),
        "shared_prefix": bench_shared_prefix(
            engine, settings, args.prefix_requests, args.system_prompt_tokens
        ),
        "transformers": bench_transformers(args.checkpoint_dir, engine, requests, args.max_tokens),
    }
    # Other processes on a small machine skew every figure above; say how busy it was.
    result["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    result["cpu_count"] = os.cpu_count()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
