"""The paged KV cache's memory, and attention that reads it through each sequence's block table.

`PagedKVCache` holds keys and values for `block_count` blocks of `block_tokens` tokens each, per layer,
stored head-major as (L, nkv, block_count * block_tokens, hs): token `p` of a sequence whose block table
is `table` lives at row `table[p // block_tokens] * block_tokens + p % block_tokens`. Head-major, a
gather (`index_select` over rows) yields keys whose last two dims are contiguous, as the attention
kernel wants them, with no further copy. A step writes its new
keys and values at their rows in one indexed store, then gathers each sequence's rows (in position
order) and calls `scaled_dot_product_attention` on them: plain PyTorch, the same code on CPU and CUDA.
Decodes (one new token each) attend in batched calls over their gathered keys, padded and masked: sorted
by context length into up to `DECODE_GROUPS_MAX` groups, so short sequences are not padded to the longest
one (the padding would be gathered and attended for nothing); prefill chunks attend one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from inference.model import ModelConfig, additive_mask, offset_causal_mask

DECODE_GROUPS_MAX = 4  # decode attention calls per layer, sequences grouped by context length
DECODE_GROUP_SEQUENCES_MIN = 16  # fewer decodes than this per group are attended in one call


class PagedKVCache:
    """Preallocated keys and values of `block_count` blocks; memory is fixed and reported by `bytes_total`."""

    def __init__(
        self,
        config: ModelConfig,
        block_count: int,
        block_tokens: int,
        context_tokens_max: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        assert block_count > 0 and block_tokens > 0, "a cache needs blocks of at least one token"
        assert 0 < context_tokens_max <= config.block_size, (
            f"context_tokens_max {context_tokens_max} must be in 1..block_size {config.block_size}"
        )
        shape = (config.n_layer, config.kv_head_count, block_count * block_tokens, config.head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)  # (L, nkv, rows, hs)
        self.values = torch.zeros(shape, device=device, dtype=dtype)  # (L, nkv, rows, hs)
        self.block_count = block_count
        self.block_tokens = block_tokens
        self.context_tokens_max = context_tokens_max
        self._gather_buffers: dict[str, torch.Tensor] = {}  # reused across steps (see `gather`)

    def gather(self, source: torch.Tensor, rows: torch.Tensor, name: str) -> torch.Tensor:
        """`source` (nkv, rows, hs) at `rows` (n,) -> (nkv, n, hs), written into a buffer kept per `name`
        and grown when needed: a fresh multi-megabyte tensor per layer and step would be fresh pages, and
        their page faults cost many times the copy itself on CPU."""
        heads, width = source.size(0), source.size(2)
        size = heads * rows.numel() * width
        buffer = self._gather_buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != source.dtype:
            buffer = torch.empty(size, dtype=source.dtype, device=source.device)
            self._gather_buffers[name] = buffer
        out = buffer[:size].view(heads, rows.numel(), width)
        return torch.index_select(source, 1, rows, out=out)

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        element_bytes = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layer * config.kv_head_count * config.head_size * element_bytes  # keys + values

    @property
    def bytes_total(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


@dataclass
class PagedDecodes:
    """The sequences of a step that feed exactly one token, attended in one call."""

    token_rows: torch.Tensor | None  # (D,) packed rows of the decode tokens; None: all N rows, in order
    key_rows: torch.Tensor  # (D, Tk) cache rows of each sequence's keys in position order, padded
    visible: torch.Tensor  # (D, 1, 1, Tk) additive mask (0 / -inf) hiding the padding


@dataclass
class PagedPrefill:
    """A sequence feeding several tokens at positions start..start+length-1."""

    rows: slice
    key_rows: torch.Tensor  # (start+length,) cache rows of its keys in position order
    visible: torch.Tensor | None  # (length, start+length) additive mask; None: start == 0, plain causal


@dataclass
class PagedBatch:
    """The new tokens of one engine step, for several sequences, packed into one row of N tokens.

    Field for field what the models' `forward_packed` reads from a `PackedBatch`, with block-table
    addressing in place of slots; built once per step and shared by every layer.
    """

    token_ids: torch.Tensor  # (N,) long
    positions: torch.Tensor  # (N,) long, absolute position of each token in its sequence
    write_rows: torch.Tensor  # (N,) long, the cache row each new key/value is stored at
    last_token_rows: torch.Tensor  # (S,) long, packed index of each sequence's last new token
    position_max: int  # the furthest cache position written this step
    decodes: list[PagedDecodes]  # groups of decodes by context length; empty: none this step
    prefills: list[PagedPrefill]

    @classmethod
    def build(
        cls,
        block_tables: list[list[int]],
        starts: list[int],
        chunks: list[list[int]],
        block_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> PagedBatch:
        assert len(block_tables) == len(starts) == len(chunks) > 0, "one table, start and chunk per sequence"
        assert all(len(chunk) > 0 for chunk in chunks), "every sequence feeds at least one token"
        lengths = [len(chunk) for chunk in chunks]
        contexts = [start + length for start, length in zip(starts, lengths, strict=True)]
        for table, context in zip(block_tables, contexts, strict=True):
            assert len(table) * block_tokens >= context, "the block table does not cover the sequence"
        offsets, total = [], 0
        for length in lengths:
            offsets.append(total)
            total += length

        def long_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        prefills = [
            PagedPrefill(
                rows=slice(offsets[i], offsets[i] + lengths[i]),
                key_rows=_key_rows([block_tables[i]], contexts[i], block_tokens, device)[0],
                visible=None if starts[i] == 0 else offset_causal_mask(starts[i], lengths[i], device, dtype),
            )
            for i in range(len(chunks))
            if lengths[i] > 1
        ]
        decode_indices = [i for i, length in enumerate(lengths) if length == 1]
        write_rows = [
            table[p // block_tokens] * block_tokens + p % block_tokens
            for table, start, context in zip(block_tables, starts, contexts, strict=True)
            for p in range(start, context)
        ]
        return cls(
            token_ids=long_tensor([token for chunk in chunks for token in chunk]),
            positions=long_tensor([s + i for s, n in zip(starts, lengths, strict=True) for i in range(n)]),
            write_rows=long_tensor(write_rows),
            last_token_rows=long_tensor([o + n - 1 for o, n in zip(offsets, lengths, strict=True)]),
            position_max=max(contexts) - 1,
            decodes=[
                _decodes(
                    [block_tables[i] for i in group],
                    [contexts[i] for i in group],
                    None if group == list(range(total)) else [offsets[i] for i in group],
                    block_tokens,
                    device,
                    dtype,
                )
                for group in _decode_groups(decode_indices, contexts)
            ],
            prefills=prefills,
        )

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache, layer: int
    ) -> torch.Tensor:
        return paged_attention(q, k, v, self, cache, layer)


def _key_rows(
    tables: list[list[int]], context_max: int, block_tokens: int, device: torch.device
) -> torch.Tensor:
    """(S, context_max): the cache row of each position of each sequence, from its block table (a table
    shorter than the longest is padded with block 0, whose rows the caller masks out)."""
    width = -(-context_max // block_tokens)
    padded = torch.tensor(
        [table[:width] + [0] * (width - len(table[:width])) for table in tables],
        dtype=torch.long,
        device=device,
    )  # (S, blocks)
    offsets = torch.arange(block_tokens, dtype=torch.long, device=device)
    return (padded.unsqueeze(-1) * block_tokens + offsets).reshape(len(tables), -1)[:, :context_max]


def _decode_groups(indices: list[int], contexts: list[int]) -> list[list[int]]:
    """The decoding sequences in groups of similar context length (one group when there are few)."""
    count = min(DECODE_GROUPS_MAX, len(indices) // DECODE_GROUP_SEQUENCES_MIN)
    if count <= 1:
        return [indices] if indices else []
    ordered = sorted(indices, key=lambda i: contexts[i])
    size = -(-len(ordered) // count)
    return [ordered[start : start + size] for start in range(0, len(ordered), size)]


def _decodes(
    tables: list[list[int]],
    contexts: list[int],
    token_rows: list[int] | None,
    block_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
) -> PagedDecodes:
    context_max = max(contexts)
    lengths = torch.tensor(contexts, dtype=torch.long, device=device)
    key_positions = torch.arange(context_max, device=device)
    visible = additive_mask(key_positions.unsqueeze(0) < lengths.unsqueeze(1), dtype)[:, None, None, :]
    return PagedDecodes(
        token_rows=None if token_rows is None else torch.tensor(token_rows, dtype=torch.long, device=device),
        key_rows=_key_rows(tables, context_max, block_tokens, device),
        visible=visible,
    )


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PagedBatch, cache: PagedKVCache, layer: int
) -> torch.Tensor:
    """Store the step's keys/values at their rows, then attend. q: (N, nh, hs); k, v: (N, nkv, hs).

    With fewer key/value heads than query heads (grouped-query attention), each group of query heads
    shares one cached head.
    """
    layer_keys, layer_values = cache.keys[layer], cache.values[layer]  # (nkv, rows, hs)
    layer_keys.index_copy_(1, batch.write_rows, k.transpose(0, 1).to(layer_keys.dtype))
    layer_values.index_copy_(1, batch.write_rows, v.transpose(0, 1).to(layer_values.dtype))
    grouped = q.size(1) != k.size(1)
    decodes = batch.decodes
    if len(decodes) == 1 and decodes[0].token_rows is None:
        return _attend_decodes(q, decodes[0], cache, layer, grouped)  # every token is a decode, in order
    y = torch.empty_like(q)  # (N, nh, hs)
    for group in decodes:
        y[group.token_rows] = _attend_decodes(q[group.token_rows], group, cache, layer, grouped)
    for chunk in batch.prefills:
        y[chunk.rows] = _attend_chunk(q[chunk.rows], chunk, cache, layer, grouped)
    return y


def _attend_decodes(
    q: torch.Tensor, decode: PagedDecodes, cache: PagedKVCache, layer: int, grouped: bool
) -> torch.Tensor:
    """One new token per sequence (q: (D, nh, hs)), every sequence in one call over its gathered keys."""
    layer_keys, layer_values = cache.keys[layer], cache.values[layer]  # (nkv, rows, hs)
    shape = (layer_keys.size(0), *decode.key_rows.shape, layer_keys.size(2))  # (nkv, D, Tk, hs)
    rows = decode.key_rows.reshape(-1)
    keys = cache.gather(layer_keys, rows, "keys").view(shape).transpose(0, 1)  # (D, nkv, Tk, hs)
    values = cache.gather(layer_values, rows, "values").view(shape).transpose(0, 1)  # (D, nkv, Tk, hs)
    y = F.scaled_dot_product_attention(
        q.unsqueeze(2).to(keys.dtype), keys, values, attn_mask=decode.visible, enable_gqa=grouped
    ).squeeze(2)  # (D, nh, hs)
    return y.to(q.dtype)


def _attend_chunk(
    q: torch.Tensor, chunk: PagedPrefill, cache: PagedKVCache, layer: int, grouped: bool
) -> torch.Tensor:
    """A chunk of T tokens at positions start..start+T-1 attends to its sequence up to itself."""
    layer_keys, layer_values = cache.keys[layer], cache.values[layer]  # (nkv, rows, hs)
    q_chunk = q.transpose(0, 1).unsqueeze(0).to(layer_keys.dtype)  # (1, nh, T, hs)
    keys = cache.gather(layer_keys, chunk.key_rows, "keys").unsqueeze(0)  # (1, nkv, Tk, hs)
    values = cache.gather(layer_values, chunk.key_rows, "values").unsqueeze(0)  # (1, nkv, Tk, hs)
    if chunk.visible is None:
        # Fast path: the chunk is the whole context, so the plain causal kernel applies.
        y = F.scaled_dot_product_attention(q_chunk, keys, values, is_causal=True, enable_gqa=grouped)
    else:
        # is_causal aligns the mask top-left, but our queries sit at the end of the keys.
        y = F.scaled_dot_product_attention(q_chunk, keys, values, attn_mask=chunk.visible, enable_gqa=grouped)
    return y.squeeze(0).transpose(0, 1).to(q.dtype)  # (T, nh, hs)
