"""The model: checkpoint round trip against a reference forward pass, and the packed (cached) pass."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from inference.model import GPT, GPTConfig, KVCache, PackedBatch, load_checkpoint, write_safetensors

CONFIG = {"model_type": "gpt2", "vocab_size": 97, "n_positions": 64, "n_layer": 2, "n_head": 4, "n_embd": 32}


def random_gpt2_tensors(seed: int) -> dict[str, torch.Tensor]:
    """A GPT-2 checkpoint as Hugging Face stores it: Conv1D weights (in, out), no lm_head (tied)."""
    generator = torch.Generator().manual_seed(seed)
    C, V, P = CONFIG["n_embd"], CONFIG["vocab_size"], CONFIG["n_positions"]

    def random(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    tensors = {
        "wte.weight": random(V, C),
        "wpe.weight": random(P, C),
        "ln_f.weight": 1 + random(C),
        "ln_f.bias": random(C),
    }
    for layer in range(CONFIG["n_layer"]):
        prefix = f"h.{layer}."
        tensors |= {
            prefix + "ln_1.weight": 1 + random(C),
            prefix + "ln_1.bias": random(C),
            prefix + "attn.c_attn.weight": random(C, 3 * C),
            prefix + "attn.c_attn.bias": random(3 * C),
            prefix + "attn.c_proj.weight": random(C, C),
            prefix + "attn.c_proj.bias": random(C),
            prefix + "ln_2.weight": 1 + random(C),
            prefix + "ln_2.bias": random(C),
            prefix + "mlp.c_fc.weight": random(C, 4 * C),
            prefix + "mlp.c_fc.bias": random(4 * C),
            prefix + "mlp.c_proj.weight": random(4 * C, C),
            prefix + "mlp.c_proj.bias": random(C),
        }
    return tensors


def reference_logits(tensors: dict[str, torch.Tensor], token_ids: list[int]) -> torch.Tensor:
    """GPT-2 written out longhand from the stored tensors, with explicit loops over heads."""
    C, nh = CONFIG["n_embd"], CONFIG["n_head"]
    hs, T = C // nh, len(token_ids)
    x = tensors["wte.weight"][token_ids] + tensors["wpe.weight"][:T]  # (T, C)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for layer in range(CONFIG["n_layer"]):
        p = f"h.{layer}."
        h = F.layer_norm(x, (C,), tensors[p + "ln_1.weight"], tensors[p + "ln_1.bias"], eps=1e-5)
        qkv = h @ tensors[p + "attn.c_attn.weight"] + tensors[p + "attn.c_attn.bias"]  # Conv1D: x @ W + b
        q, k, v = qkv.split(C, dim=1)
        heads = []
        for head in range(nh):
            columns = slice(head * hs, (head + 1) * hs)
            scores = (q[:, columns] @ k[:, columns].T) / math.sqrt(hs)
            scores = scores.masked_fill(~causal, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v[:, columns])
        attention = (
            torch.cat(heads, dim=1) @ tensors[p + "attn.c_proj.weight"] + tensors[p + "attn.c_proj.bias"]
        )
        x = x + attention
        h = F.layer_norm(x, (C,), tensors[p + "ln_2.weight"], tensors[p + "ln_2.bias"], eps=1e-5)
        h = h @ tensors[p + "mlp.c_fc.weight"] + tensors[p + "mlp.c_fc.bias"]
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))  # gelu_new
        x = x + h @ tensors[p + "mlp.c_proj.weight"] + tensors[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (C,), tensors["ln_f.weight"], tensors["ln_f.bias"], eps=1e-5)
    return x @ tensors["wte.weight"].T  # (T, V), tied head


@pytest.fixture()
def checkpoint(tmp_path):
    tensors = random_gpt2_tensors(seed=7)
    write_safetensors(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return tmp_path, tensors


def test_loaded_checkpoint_matches_reference_forward(checkpoint):
    directory, tensors = checkpoint
    model = load_checkpoint(directory, torch.device("cpu"), torch.float64)
    token_ids = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    expected = reference_logits({k: v.double() for k, v in tensors.items()}, token_ids)
    with torch.inference_mode():
        actual = model(torch.tensor([token_ids]))[0]
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def test_checkpoint_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(tmp_path, torch.device("cpu"), torch.float32)


def test_non_gpt2_config_is_refused(checkpoint):
    directory, _ = checkpoint
    (directory / "config.json").write_text(json.dumps(CONFIG | {"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type"):
        load_checkpoint(directory, torch.device("cpu"), torch.float32)


def test_packed_pass_with_chunks_and_decodes_matches_full_forward():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=16)
    model = GPT(config).double().eval()
    cache = KVCache(
        config, slot_count=3, context_tokens_max=64, device=torch.device("cpu"), dtype=torch.float64
    )
    sequences = {0: [5, 6, 7, 8, 9, 10, 11], 2: [1, 2, 3], 1: [40, 41, 42, 43, 44]}
    # Step 1: slot 0 feeds its first 4 tokens, slot 2 its whole prompt. Step 2: slot 0 feeds 3 more,
    # slot 2 decodes one token, slot 1 feeds its prompt. Positions resume where the cache left off.
    steps = [
        {0: (0, 4), 2: (0, 2)},
        {0: (4, 3), 2: (2, 1), 1: (0, 5)},
    ]
    with torch.inference_mode():
        for plan in steps:
            slots = list(plan)
            batch = PackedBatch.build(
                slots=slots,
                starts=[plan[slot][0] for slot in slots],
                chunks=[sequences[slot][plan[slot][0] : sum(plan[slot])] for slot in slots],
                device=torch.device("cpu"),
                dtype=torch.float64,
            )
            logits = model.forward_packed(batch, cache)
            for row, slot in enumerate(slots):
                end = sum(plan[slot])
                expected = model(torch.tensor([sequences[slot][:end]]))[0, -1]
                torch.testing.assert_close(logits[row], expected, rtol=1e-10, atol=1e-10)


def test_kv_cache_reports_the_bytes_it_holds():
    config = GPTConfig(vocab_size=50, block_size=64, n_layer=3, n_head=2, n_embd=16)
    cache = KVCache(
        config, slot_count=5, context_tokens_max=40, device=torch.device("cpu"), dtype=torch.float16
    )
    assert cache.bytes_total == KVCache.bytes_for(config, 5, 40, torch.float16) == 2 * 3 * 5 * 40 * 16 * 2
    slots = [cache.allocate() for _ in range(5)]
    assert sorted(slots) == [0, 1, 2, 3, 4] and cache.free_slot_count == 0
    cache.release(slots[2])
    assert cache.free_slot_count == 1 and cache.allocate() == slots[2]
