"""A decoder-only transformer (GPT-2 layout) with a packed, slot-addressed KV cache.

Two forward passes share the same weights:
- `GPT.forward(idx)`: the plain (B, T) causal pass with no cache, used for training and as a reference.
- `GPT.forward_packed(batch, cache)`: the serving pass. The new tokens of many sequences are packed
  into one (N,) row so every Linear runs once per step; each sequence reads and writes its own slot
  of the preallocated `KVCache`. Sequences that feed one token (decode) attend in one batched call;
  sequences that feed a chunk of their prompt (prefill) attend one by one.

Checkpoints use the Hugging Face GPT-2 layout: `config.json` (n_layer, n_head, n_embd, n_positions,
vocab_size, layer_norm_epsilon) and safetensors weights whose attention/MLP projections are Conv1D
(stored as (in, out), the transpose of nn.Linear). `load_checkpoint` and `save_checkpoint` convert.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import safetensors
import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch.nn import functional as F

CONFIG_FILE_NAME = "config.json"
WEIGHTS_FILE_NAME = "model.safetensors"

# GPT-2 Conv1D weights are stored (in_features, out_features); nn.Linear wants (out, in).
CONV1D_WEIGHT_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # tokens in the tokenizer (GPT-2: 50257)
    block_size: int = 1024  # maximum context length in tokens (HF name: n_positions)
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # embedding width; head size is n_embd // n_head
    layer_norm_epsilon: float = 1e-5  # LayerNorm epsilon (GPT-2: 1e-5)
    eos_token_id: int | None = None  # generation stops here; None: never stops on a token

    def __post_init__(self) -> None:
        assert self.n_embd % self.n_head == 0, f"n_embd {self.n_embd} must divide by n_head {self.n_head}"
        assert self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}"
        assert self.block_size > 0, f"block_size must be positive, got {self.block_size}"

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_head_count(self) -> int:
        return self.n_head  # GPT-2 caches one key/value head per query head

    @classmethod
    def from_hf_dict(cls, raw: dict) -> GPTConfig:
        """Read a Hugging Face GPT-2 config.json dict; unknown keys are ignored."""
        model_type = raw.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"config.json model_type is {model_type!r}; only 'gpt2' layout is supported")
        return cls(
            vocab_size=int(raw["vocab_size"]),
            block_size=int(raw.get("n_positions", raw.get("n_ctx", 1024))),
            n_layer=int(raw["n_layer"]),
            n_head=int(raw["n_head"]),
            n_embd=int(raw["n_embd"]),
            layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
            eos_token_id=raw.get("eos_token_id"),
        )

    def to_hf_dict(self) -> dict:
        fields = asdict(self)
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": fields["vocab_size"],
            "n_positions": fields["block_size"],
            "n_ctx": fields["block_size"],
            "n_layer": fields["n_layer"],
            "n_head": fields["n_head"],
            "n_embd": fields["n_embd"],
            "layer_norm_epsilon": fields["layer_norm_epsilon"],
            "eos_token_id": fields["eos_token_id"],
            "bos_token_id": fields["eos_token_id"],
            "activation_function": "gelu_new",
            "tie_word_embeddings": True,
        }


class ModelConfig(Protocol):
    """What the cache and the engine need from any model layout's config."""

    vocab_size: int
    block_size: int
    n_layer: int
    eos_token_id: int | None

    @property
    def head_size(self) -> int: ...

    @property
    def kv_head_count(self) -> int: ...


class KVCache:
    """Preallocated keys and values: `slot_count` sequences of up to `context_tokens_max` tokens each.

    Memory is fixed at construction and reported by `bytes_total`; a sequence owns one slot from
    admission to finish, so admission only needs a free slot.
    """

    def __init__(
        self,
        config: ModelConfig,
        slot_count: int,
        context_tokens_max: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        assert slot_count > 0, "slot_count must be positive"
        assert 0 < context_tokens_max <= config.block_size, (
            f"context_tokens_max {context_tokens_max} must be in 1..block_size {config.block_size}"
        )
        shape = (config.n_layer, slot_count, config.kv_head_count, context_tokens_max, config.head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)  # (L, slots, nkv, T, hs)
        self.values = torch.zeros(shape, device=device, dtype=dtype)  # (L, slots, nkv, T, hs)
        self.slot_count = slot_count
        self.context_tokens_max = context_tokens_max
        self._free_slots = list(range(slot_count - 1, -1, -1))  # pop() hands out the lowest slot first

    @staticmethod
    def bytes_for(config: ModelConfig, slot_count: int, context_tokens_max: int, dtype: torch.dtype) -> int:
        element_bytes = torch.empty((), dtype=dtype).element_size()
        per_token = (
            2 * config.n_layer * config.kv_head_count * config.head_size * element_bytes
        )  # keys + values
        return per_token * slot_count * context_tokens_max

    @property
    def bytes_total(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    @property
    def free_slot_count(self) -> int:
        return len(self._free_slots)

    def allocate(self) -> int:
        assert self._free_slots, "allocate() called with no free slot; check free_slot_count first"
        return self._free_slots.pop()

    def release(self, slot: int) -> None:
        assert 0 <= slot < self.slot_count, f"slot {slot} out of range"
        assert slot not in self._free_slots, f"slot {slot} released twice"
        self._free_slots.append(slot)
        self._free_slots.sort(reverse=True)


@dataclass
class DecodeGroup:
    """The sequences of a step that feed exactly one token, attended in one call.

    Keys are read as a view of the contiguous slot range [slot_low, slot_high) instead of gathering
    each slot (a copy of every key, every layer). Slots in the range that are not decoding this step
    get a one-key mask so their rows stay finite, and their results are dropped.
    """

    token_rows: torch.Tensor | None  # (D,) packed rows of the decode tokens; None: all N rows, in order
    slot_low: int
    slot_high: int
    range_rows: (
        torch.Tensor | None
    )  # (D,) slot - slot_low per decode token; None: exactly the range, in order
    context_max: int  # keys to read: the longest decode context
    visible: torch.Tensor  # (R, 1, 1, context_max) additive mask (0 / -inf), R = slot_high - slot_low


@dataclass
class PrefillChunk:
    """A sequence feeding several tokens at positions start..start+length-1."""

    rows: slice
    slot: int
    start: int
    visible: torch.Tensor | None  # (length, start+length) additive mask; None: start == 0, plain causal


@dataclass
class PackedBatch:
    """The new tokens of one engine step, for several sequences, packed into one row of N tokens.

    Masks and indices are built once per step here and shared by every layer.
    """

    token_ids: torch.Tensor  # (N,) long
    positions: torch.Tensor  # (N,) long, absolute position of each token in its sequence
    token_slots: torch.Tensor  # (N,) long, the slot of each token's sequence
    last_token_rows: torch.Tensor  # (S,) long, packed index of each sequence's last new token
    position_max: int  # the furthest cache position written this step
    decode: DecodeGroup | None
    prefills: list[PrefillChunk]

    @classmethod
    def build(
        cls,
        slots: list[int],
        starts: list[int],
        chunks: list[list[int]],
        device: torch.device,
        dtype: torch.dtype,
    ) -> PackedBatch:
        assert len(slots) == len(starts) == len(chunks) > 0, "one slot, start and chunk per sequence"
        assert all(len(chunk) > 0 for chunk in chunks), "every sequence feeds at least one token"
        assert len(set(slots)) == len(slots), "two sequences share a slot"
        lengths = [len(chunk) for chunk in chunks]
        offsets, total = [], 0
        for length in lengths:
            offsets.append(total)
            total += length

        def long_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        decode_indices = [i for i, length in enumerate(lengths) if length == 1]
        prefills = [
            PrefillChunk(
                rows=slice(offsets[i], offsets[i] + lengths[i]),
                slot=slots[i],
                start=starts[i],
                visible=None if starts[i] == 0 else offset_causal_mask(starts[i], lengths[i], device, dtype),
            )
            for i in range(len(slots))
            if lengths[i] > 1
        ]
        return cls(
            token_ids=long_tensor([token for chunk in chunks for token in chunk]),
            positions=long_tensor([s + i for s, n in zip(starts, lengths, strict=True) for i in range(n)]),
            token_slots=long_tensor([slot for slot, n in zip(slots, lengths, strict=True) for _ in range(n)]),
            last_token_rows=long_tensor([o + n - 1 for o, n in zip(offsets, lengths, strict=True)]),
            position_max=max(s + n - 1 for s, n in zip(starts, lengths, strict=True)),
            decode=_decode_group(decode_indices, slots, starts, offsets, total, device, dtype)
            if decode_indices
            else None,
            prefills=prefills,
        )

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int
    ) -> torch.Tensor:
        return packed_attention(q, k, v, self, cache, layer)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where visible, -inf elsewhere. CPU SDPA is several times faster with this than with a bool mask."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
        ~visible, float("-inf")
    )


def offset_causal_mask(start: int, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    query_positions = torch.arange(start, start + length, device=device)
    key_positions = torch.arange(start + length, device=device)
    return additive_mask(key_positions.unsqueeze(0) <= query_positions.unsqueeze(1), dtype)  # (T, Tk)


def _decode_group(
    indices: list[int],
    slots: list[int],
    starts: list[int],
    offsets: list[int],
    total: int,
    device: torch.device,
    dtype: torch.dtype,
) -> DecodeGroup:
    decode_slots = [slots[i] for i in indices]
    slot_low, slot_high = min(decode_slots), max(decode_slots) + 1
    context_lengths = [1] * (slot_high - slot_low)  # slots not decoding see one key: finite, then dropped
    for i in indices:
        context_lengths[slots[i] - slot_low] = starts[i] + 1
    context_max = max(context_lengths)
    key_positions = torch.arange(context_max, device=device)
    lengths = torch.tensor(context_lengths, dtype=torch.long, device=device)
    visible = additive_mask(key_positions.unsqueeze(0) < lengths.unsqueeze(1), dtype)[
        :, None, None, :
    ]  # (R, 1, 1, Tk)
    token_rows = [offsets[i] for i in indices]
    range_rows = [slot - slot_low for slot in decode_slots]
    return DecodeGroup(
        token_rows=None if token_rows == list(range(total)) else torch.tensor(token_rows, device=device),
        slot_low=slot_low,
        slot_high=slot_high,
        range_rows=None
        if range_rows == list(range(slot_high - slot_low))
        else torch.tensor(range_rows, device=device),
        context_max=context_max,
        visible=visible,
    )


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v projections in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # (B, T, C)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)

    def forward_packed(self, x: torch.Tensor, batch: PackedBatch, cache: KVCache, layer: int) -> torch.Tensor:
        N, C = x.size()  # (N, C)
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=1)
        shape = (N, self.n_head, hs)
        y = batch.attend(q.reshape(shape), k.reshape(shape), v.reshape(shape), cache, layer)  # (N, nh, hs)
        return self.c_proj(y.reshape(N, C))


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch, cache: KVCache, layer: int
) -> torch.Tensor:
    """Store the step's keys/values in the cache, then attend. q: (N, nh, hs); k, v: (N, nkv, hs).

    With fewer key/value heads than query heads (grouped-query attention), each group of query heads
    shares one cached head.
    """
    layer_keys, layer_values = cache.keys[layer], cache.values[layer]  # (slots, nkv, T, hs)
    # Write every new key/value into its slot at its position in one indexed store.
    layer_keys[batch.token_slots, :, batch.positions] = k.to(layer_keys.dtype)
    layer_values[batch.token_slots, :, batch.positions] = v.to(layer_values.dtype)
    grouped = q.size(1) != k.size(1)
    decode = batch.decode
    if decode is not None and decode.token_rows is None:
        y = _attend_decodes(q, decode, layer_keys, layer_values, grouped)  # every token is a decode
    else:
        y = torch.empty_like(q)  # (N, nh, hs)
        if decode is not None:
            y[decode.token_rows] = _attend_decodes(
                q[decode.token_rows], decode, layer_keys, layer_values, grouped
            )
    for chunk in batch.prefills:
        y[chunk.rows] = _attend_chunk(q[chunk.rows], chunk, layer_keys, layer_values, grouped)
    return y


def _attend_decodes(
    q: torch.Tensor, decode: DecodeGroup, layer_keys: torch.Tensor, layer_values: torch.Tensor, grouped: bool
) -> torch.Tensor:
    """One new token per sequence (q: (D, nh, hs)), all sequences in one call over a view of their slots."""
    keys = layer_keys[decode.slot_low : decode.slot_high, :, : decode.context_max]  # (R, nkv, Tk, hs) view
    values = layer_values[
        decode.slot_low : decode.slot_high, :, : decode.context_max
    ]  # (R, nkv, Tk, hs) view
    if decode.range_rows is None:
        q_range = q
    else:
        q_range = q.new_zeros((decode.slot_high - decode.slot_low, *q.shape[1:]))  # (R, nh, hs)
        q_range[decode.range_rows] = q
    y = F.scaled_dot_product_attention(
        q_range.unsqueeze(2).to(keys.dtype), keys, values, attn_mask=decode.visible, enable_gqa=grouped
    ).squeeze(2)  # (R, nh, hs)
    if decode.range_rows is not None:
        y = y[decode.range_rows]  # (D, nh, hs)
    return y.to(q.dtype)


def _attend_chunk(
    q: torch.Tensor, chunk: PrefillChunk, layer_keys: torch.Tensor, layer_values: torch.Tensor, grouped: bool
) -> torch.Tensor:
    """A chunk of T tokens at positions start..start+T-1 attends to the cache up to itself."""
    context = chunk.start + q.size(0)
    q_chunk = q.transpose(0, 1).unsqueeze(0).to(layer_keys.dtype)  # (1, nh, T, hs)
    keys = layer_keys[chunk.slot, :, :context].unsqueeze(0)  # (1, nkv, Tk, hs)
    values = layer_values[chunk.slot, :, :context].unsqueeze(0)  # (1, nkv, Tk, hs)
    if chunk.visible is None:
        # Fast path: the chunk is the whole context, so the plain causal kernel applies.
        y = F.scaled_dot_product_attention(q_chunk, keys, values, is_causal=True, enable_gqa=grouped)
    else:
        # Fallback: is_causal aligns the mask top-left, but our queries sit at the end of the keys.
        y = F.scaled_dot_product_attention(q_chunk, keys, values, attn_mask=chunk.visible, enable_gqa=grouped)
    return y.squeeze(0).transpose(0, 1).to(q.dtype)  # (T, nh, hs)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's gelu_new


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward_packed(self, x: torch.Tensor, batch: PackedBatch, cache: KVCache, layer: int) -> torch.Tensor:
        x = x + self.attn.forward_packed(self.ln_1(x), batch, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([TransformerBlock(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for name, parameter in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                torch.nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits for every position of (B, T) token ids, without a cache."""
        B, T = idx.size()
        assert self.config.block_size >= T, f"sequence length {T} exceeds block_size {self.config.block_size}"
        positions = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)

    def forward_packed(self, batch: PackedBatch, cache: KVCache) -> torch.Tensor:
        """Logits at the last new token of each sequence in the batch: (S, vocab)."""
        assert batch.position_max < cache.context_tokens_max, "a position exceeds the cache context"
        x = self.transformer.wte(batch.token_ids) + self.transformer.wpe(batch.positions)  # (N, C)
        for layer, block in enumerate(self.transformer.h):
            x = block.forward_packed(x, batch, cache, layer)
        x = self.transformer.ln_f(x[batch.last_token_rows])  # (S, C)
        return self.lm_head(x)  # (S, vocab)


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face GPT-2 names, Conv1D weights transposed, lm_head omitted
    (tied)."""

    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        value = tensor.t() if name.endswith(CONV1D_WEIGHT_SUFFIXES) else tensor
        state[name] = value.detach().contiguous()
    return state


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write contiguous CPU tensors as a safetensors file.

    `safetensors.torch.save_file` goes through numpy, which is not a dependency of this project, so we
    hand the tensors' own memory to the library's serializer; `tensors` keeps that memory alive.
    """
    specs = {}
    for name, tensor in tensors.items():
        assert tensor.device.type == "cpu", f"{name} must be a CPU tensor, not {tensor.device.type}"
        assert tensor.is_contiguous(), f"{name} must be contiguous"
        specs[name] = safetensors.TensorSpec(
            dtype=str(tensor.dtype).removeprefix("torch."),
            shape=list(tensor.shape),
            data_ptr=tensor.data_ptr(),
            data_len=tensor.numel() * tensor.element_size(),
        )
    safetensors.serialize_file(specs, str(path), metadata={"format": "pt"})


def save_checkpoint(model: GPT, directory: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write config.json and model.safetensors (GPT-2 layout) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.to(device="cpu", dtype=dtype).contiguous()
        for name, tensor in hf_state_dict(model).items()
    }
    write_safetensors(state, directory / WEIGHTS_FILE_NAME)
    (directory / CONFIG_FILE_NAME).write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")


def load_checkpoint(directory: Path, device: torch.device, dtype: torch.dtype) -> GPT:
    """Load a GPT-2 layout checkpoint directory (config.json + model.safetensors) onto `device`."""
    config_path, weights_path = directory / CONFIG_FILE_NAME, directory / WEIGHTS_FILE_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"checkpoint {directory} needs {CONFIG_FILE_NAME} and {WEIGHTS_FILE_NAME}")
    config = GPTConfig.from_hf_dict(json.loads(config_path.read_text()))
    raw = load_file(str(weights_path))
    state = {}
    for name, tensor in raw.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # GPT-2's stored causal-mask buffers; we build masks on the fly
        local_name = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        state[local_name] = tensor.t() if local_name.endswith(CONV1D_WEIGHT_SUFFIXES) else tensor
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    model = GPT(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {directory} does not match GPT-2 layout: missing={missing} unexpected={unexpected}"
        )
    return model.to(device=device, dtype=dtype).eval()
