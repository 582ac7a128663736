"""Llama layout: checkpoint round trip against a longhand reference, and serving through the engine."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from inference.checkpoint import load_model
from inference.engine import Engine, GenerationRequest
from inference.llama import Llama
from inference.model import write_safetensors
from tests.inference.conftest import completion_token_ids, engine_settings, run_to_completion

CONFIG = {
    "model_type": "llama",
    "vocab_size": 2048,  # the default tokenizer's size, so the engine can serve it
    "max_position_embeddings": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 32,
    "intermediate_size": 48,
    "rms_norm_eps": 1e-6,
    "rope_theta": 500.0,
    "tie_word_embeddings": False,
}


def random_llama_tensors(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    C, inner, V = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    kv_width = C // CONFIG["num_attention_heads"] * CONFIG["num_key_value_heads"]

    def random(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    tensors = {
        "model.embed_tokens.weight": random(V, C),
        "model.norm.weight": 1 + random(C),
        "lm_head.weight": random(V, C),
    }
    for layer in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors |= {
            p + "input_layernorm.weight": 1 + random(C),
            p + "self_attn.q_proj.weight": random(C, C),
            p + "self_attn.k_proj.weight": random(kv_width, C),
            p + "self_attn.v_proj.weight": random(kv_width, C),
            p + "self_attn.o_proj.weight": random(C, C),
            p + "post_attention_layernorm.weight": 1 + random(C),
            p + "mlp.gate_proj.weight": random(inner, C),
            p + "mlp.up_proj.weight": random(inner, C),
            p + "mlp.down_proj.weight": random(C, inner),
        }
    return tensors


def reference_logits(t: dict[str, torch.Tensor], token_ids: list[int]) -> torch.Tensor:
    """Llama written out longhand: per-head loops, each rotary pair (i, i + hs/2) rotated explicitly."""
    C, nh, nkv = CONFIG["hidden_size"], CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"]
    hs, T, eps = C // nh, len(token_ids), CONFIG["rms_norm_eps"]

    def rms(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight

    def rotate(x):  # x: (T, hs)
        out = torch.empty_like(x)
        for i in range(hs // 2):
            angle = torch.arange(T, dtype=x.dtype) / CONFIG["rope_theta"] ** (2 * i / hs)
            a, b = x[:, i], x[:, i + hs // 2]
            out[:, i] = a * torch.cos(angle) - b * torch.sin(angle)
            out[:, i + hs // 2] = b * torch.cos(angle) + a * torch.sin(angle)
        return out

    x = t["model.embed_tokens.weight"][token_ids]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for layer in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms(x, t[p + "input_layernorm.weight"])
        q, k, v = (h @ t[p + f"self_attn.{name}_proj.weight"].T for name in "qkv")
        heads = []
        for head in range(nh):
            kv_head = head // (nh // nkv)  # query heads share key/value heads in groups
            qh = rotate(q[:, head * hs : (head + 1) * hs])
            kh = rotate(k[:, kv_head * hs : (kv_head + 1) * hs])
            scores = (qh @ kh.T / math.sqrt(hs)).masked_fill(~causal, float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v[:, kv_head * hs : (kv_head + 1) * hs])
        x = x + torch.cat(heads, 1) @ t[p + "self_attn.o_proj.weight"].T
        h = rms(x, t[p + "post_attention_layernorm.weight"])
        gate, up = h @ t[p + "mlp.gate_proj.weight"].T, h @ t[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ t[p + "mlp.down_proj.weight"].T
    return rms(x, t["model.norm.weight"]) @ t["lm_head.weight"].T


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    tensors = random_llama_tensors(seed=3)
    write_safetensors(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(CONFIG))
    return directory, tensors


def test_loaded_llama_matches_reference_forward(llama_checkpoint):
    directory, tensors = llama_checkpoint
    model = load_model(directory, torch.device("cpu"), torch.float64)
    assert isinstance(model, Llama)
    token_ids = [5, 900, 17, 2000, 64, 3, 3, 1024, 77]
    expected = reference_logits({k: v.double() for k, v in tensors.items()}, token_ids)
    with torch.inference_mode():
        actual = model(torch.tensor([token_ids]))[0]
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def test_llama_batched_greedy_equals_alone_and_the_plain_pass(llama_checkpoint, tokenizer):
    directory, _ = llama_checkpoint
    model = load_model(directory, torch.device("cpu"), torch.float64)
    prompts = ["The", "Permission is hereby granted, free of charge, to any person", "A class", "x y z w"]
    requests = [GenerationRequest(request_id=f"r{i}", prompt=p, max_tokens=10) for i, p in enumerate(prompts)]

    def engine(**overrides) -> Engine:
        return Engine(model, tokenizer, engine_settings(**overrides))

    batched = run_to_completion(
        engine(step_tokens_max=8, prefill_chunk_tokens_max=4), {0: requests[:2], 3: requests[2:]}
    )
    for request in requests:
        alone = run_to_completion(engine(), {0: [request]})
        assert completion_token_ids(batched[request.request_id]) == completion_token_ids(
            alone[request.request_id]
        )
        token_ids = tokenizer.encode(request.prompt)
        with torch.inference_mode():
            for _ in range(10):
                token_ids.append(int(model(torch.tensor([token_ids]))[0, -1].argmax()))
        assert completion_token_ids(alone[request.request_id]) == token_ids[-10:]


def test_rope_scaling_is_refused(tmp_path, llama_checkpoint):
    directory, _ = llama_checkpoint
    (tmp_path / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(
        json.dumps(CONFIG | {"rope_scaling": {"type": "linear", "factor": 2.0}})
    )
    with pytest.raises(ValueError, match="rope_scaling"):
        load_model(tmp_path, torch.device("cpu"), torch.float32)
