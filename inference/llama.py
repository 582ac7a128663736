"""A Llama-layout decoder (RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention).

It loads Hugging Face Llama checkpoints (`model_type: "llama"`: config.json + model.safetensors with
names like `model.layers.0.self_attn.q_proj.weight`) and serves through the same packed batches as the
GPT-2 layout: the paged KV cache (`inference.paged_attention`) or the slot cache (`inference.model`).
Rotary scaling variants (`rope_scaling`) are refused rather than silently computed wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch.nn import functional as F

from inference.model import CONFIG_FILE_NAME, WEIGHTS_FILE_NAME, KVCache, PackedBatch


@dataclass
class LlamaConfig:
    vocab_size: int = 32000  # tokens in the tokenizer
    block_size: int = 2048  # maximum context length (HF: max_position_embeddings)
    n_layer: int = 22  # decoder layers (HF: num_hidden_layers)
    n_head: int = 32  # query heads (HF: num_attention_heads)
    n_kv_head: int = 4  # key/value heads; n_head must be a multiple (HF: num_key_value_heads)
    n_embd: int = 2048  # hidden width (HF: hidden_size)
    intermediate_size: int = 5632  # SwiGLU inner width
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # rotary base
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        assert self.n_embd % self.n_head == 0, f"n_embd {self.n_embd} must divide by n_head {self.n_head}"
        assert self.n_head % self.n_kv_head == 0, (
            f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}"
        )
        assert self.head_size % 2 == 0, "rotary embeddings need an even head size"

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_head_count(self) -> int:
        return self.n_kv_head

    @classmethod
    def from_hf_dict(cls, raw: dict) -> LlamaConfig:
        if raw.get("model_type") != "llama":
            raise ValueError(f"config.json model_type is {raw.get('model_type')!r}, not 'llama'")
        if raw.get("rope_scaling") is not None:
            raise ValueError("config.json rope_scaling is not supported (plain rotary positions only)")
        if raw.get("head_dim") not in (None, raw["hidden_size"] // raw["num_attention_heads"]):
            raise ValueError("config.json head_dim must equal hidden_size / num_attention_heads")
        eos = raw.get("eos_token_id")
        return cls(
            vocab_size=int(raw["vocab_size"]),
            block_size=int(raw.get("max_position_embeddings", 2048)),
            n_layer=int(raw["num_hidden_layers"]),
            n_head=int(raw["num_attention_heads"]),
            n_kv_head=int(raw.get("num_key_value_heads", raw["num_attention_heads"])),
            n_embd=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,  # several ids: stop on the first
        )


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = (
            x if x.dtype == torch.float64 else x.float()
        )  # the mean of squares in at least fp32, as HF does
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_cos_sin(
    positions: torch.Tensor, head_size: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for absolute positions (...,) -> (..., hs), halves repeated (the rotate-half
    convention)."""

    wide = torch.float64 if dtype == torch.float64 else torch.float32  # angles in at least fp32, as HF does
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_size, 2, device=positions.device, dtype=wide) / head_size)
    )
    angles = positions.to(wide).unsqueeze(-1) * inv_freq  # (..., hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., hs)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        hs = config.head_size
        self.q_proj = nn.Linear(config.n_embd, config.n_head * hs, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * hs, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * hs, bias=False)
        self.o_proj = nn.Linear(config.n_head * hs, config.n_embd, bias=False)
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.n_kv_head, hs

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # (B, T, C); cos, sin: (T, hs)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_head != self.n_kv_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)

    def forward_packed(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: PackedBatch,
        cache: KVCache,
        layer: int,
    ) -> torch.Tensor:
        N, C = x.size()  # (N, C); cos, sin: (N, 1, hs)
        q = apply_rotary(self.q_proj(x).view(N, self.n_head, self.head_size), cos, sin)  # (N, nh, hs)
        k = apply_rotary(self.k_proj(x).view(N, self.n_kv_head, self.head_size), cos, sin)  # (N, nkv, hs)
        v = self.v_proj(x).view(N, self.n_kv_head, self.head_size)  # (N, nkv, hs)
        y = batch.attend(q, k, v, cache, layer)  # (N, nh, hs)
        return self.o_proj(y.reshape(N, C))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_packed(self, x, cos, sin, batch: PackedBatch, cache: KVCache, layer: int) -> torch.Tensor:
        x = x + self.self_attn.forward_packed(self.input_layernorm(x), cos, sin, batch, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
                layers=nn.ModuleList([LlamaBlock(config) for _ in range(config.n_layer)]),
                norm=RMSNorm(config.n_embd, config.rms_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_cos_sin(positions, self.config.head_size, self.config.rope_theta, dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits for every position of (B, T) token ids, without a cache."""
        B, T = idx.size()
        assert self.config.block_size >= T, f"sequence length {T} exceeds block_size {self.config.block_size}"
        x = self.model.embed_tokens(idx)  # (B, T, C)
        cos, sin = self._rotary(torch.arange(T, device=idx.device), x.dtype)  # (T, hs)
        for block in self.model.layers:
            x = block(x, cos, sin)
        return self.lm_head(self.model.norm(x))  # (B, T, vocab)

    def forward_packed(self, batch: PackedBatch, cache: KVCache) -> torch.Tensor:
        """Logits at the last new token of each sequence in the batch: (S, vocab)."""
        assert batch.position_max < cache.context_tokens_max, "a position exceeds the cache context"
        x = self.model.embed_tokens(batch.token_ids)  # (N, C)
        cos, sin = self._rotary(batch.positions, x.dtype)  # (N, hs), once per step for every layer
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (N, 1, hs): broadcast over heads
        for layer, block in enumerate(self.model.layers):
            x = block.forward_packed(x, cos, sin, batch, cache, layer)
        return self.lm_head(self.model.norm(x[batch.last_token_rows]))  # (S, vocab)


def load_llama_checkpoint(directory: Path, device: torch.device, dtype: torch.dtype) -> Llama:
    """Load a Hugging Face Llama checkpoint directory (config.json + model.safetensors)."""
    config = LlamaConfig.from_hf_dict(json.loads((directory / CONFIG_FILE_NAME).read_text()))
    state = {
        name: tensor
        for name, tensor in load_file(str(directory / WEIGHTS_FILE_NAME)).items()
        if not name.endswith("rotary_emb.inv_freq")
    }  # older exports store it; we recompute it
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model = Llama(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {directory} does not match Llama layout: missing={missing} unexpected={unexpected}"
        )
    return model.to(device=device, dtype=dtype).eval()
