"""Inference benchmark: `python -m bench.inference` prints one JSON line.

The same greedy requests (default model, mixed prompt lengths) run twice through the engine: all at once
(continuous batching) and one at a time. Reports completion tokens/s for each, the speedup, and time to
first token p50/p99 (from submission; in the concurrent run every request is submitted at t=0). Where
`transformers` is installed, the same checkpoint also runs through its `generate`, one request at a time
and padded-batched.
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
from inference.settings import EngineSettings
from inference.tokenizer import DEFAULT_MODEL_DIR

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
    started = time.perf_counter()
    for request in requests:
        engine.add_request(request)
    first_token_s: dict[str, float] = {}
    completion_tokens = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            if output.token_id is not None:
                first_token_s.setdefault(output.request_id, now - started)
            if output.finished:
                completion_tokens += output.completion_tokens
    synchronize(engine.device)
    return completion_tokens, time.perf_counter() - started, list(first_token_s.values())


def bench_engine(engine: Engine, requests: list[GenerationRequest], rounds: int) -> dict:
    """Best of `rounds` for each mode, the modes interleaved so machine load hits both alike."""
    run_engine(engine, build_requests(2, 4))  # warm-up
    concurrent_runs, sequential_runs = [], []
    for _ in range(rounds):
        concurrent_runs.append(run_engine(engine, requests))
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs per mode")
    args = parser.parse_args()
    settings = EngineSettings(
        device=args.device,
        dtype=args.dtype,
        running_sequences_max=args.requests,
        step_tokens_max=max(512, args.requests),
        prefill_chunk_tokens_max=256,
        context_tokens_max=512,
        waiting_queue_depth_max=max(256, args.requests),
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
        **bench_engine(engine, requests, args.rounds),
        "transformers": bench_transformers(args.checkpoint_dir, engine, requests, args.max_tokens),
    }
    # Other processes on a small machine skew every figure above; say how busy it was.
    result["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    result["cpu_count"] = os.cpu_count()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
