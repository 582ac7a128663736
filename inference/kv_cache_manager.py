"""Which blocks of the paged KV cache each request holds (its block table), in the shape of vLLM v1's
KVCacheManager.

A request takes blocks step by step: `allocate` gives it what the tokens of its next step need, and
nothing more, so admission needs free blocks for one step, not for a whole context. At its first
admission a request may start from the longest cached prefix of its tokens (`cached_prefix`): those
blocks are shared, not computed again. Once a step's keys and values are written, `commit_computed`
registers the request's newly full blocks in the prefix cache. `free` drops the request's references
(finish, cancel, preemption).
"""

from __future__ import annotations

from dataclasses import dataclass

from inference.block_pool import ROOT_BLOCK_HASH, BlockPool, block_hash
from inference.request import Request


@dataclass(frozen=True)
class CachedPrefix:
    blocks: list[int]
    hashes: list[bytes]  # one per block

    @property
    def block_count(self) -> int:
        return len(self.blocks)


NO_CACHED_PREFIX = CachedPrefix([], [])


class KVCacheManager:
    def __init__(self, block_count: int, block_tokens: int, prefix_caching: bool) -> None:
        assert block_tokens > 0, "a block holds at least one token"
        self.pool = BlockPool(block_count, prefix_caching)
        self.block_tokens = block_tokens
        self._blocks: dict[str, list[int]] = {}  # request id -> its block table
        self._hashes: dict[str, list[bytes]] = {}  # request id -> hashes of its registered full blocks

    @property
    def tokens_total(self) -> int:
        return self.pool.block_count * self.block_tokens

    def usage(self) -> float:
        return self.pool.usage()

    def block_table(self, request_id: str) -> list[int]:
        return self._blocks[request_id]

    def holds_blocks(self, request_id: str) -> bool:
        return request_id in self._blocks

    def blocks_for(self, token_count: int) -> int:
        return -(-token_count // self.block_tokens)

    def cached_prefix(self, request: Request) -> CachedPrefix:
        """The cached blocks of the request's longest cached prefix of full blocks. At least its last token
        is left to compute, since the next token's logits come from it."""
        assert not self.holds_blocks(request.request_id), "only a request without blocks looks up a prefix"
        if not self.pool.caching:
            return NO_CACHED_PREFIX
        tokens = request.all_token_ids()
        blocks, hashes, parent = [], [], ROOT_BLOCK_HASH
        for index in range((len(tokens) - 1) // self.block_tokens):
            hash_ = block_hash(parent, tokens[index * self.block_tokens : (index + 1) * self.block_tokens])
            block = self.pool.cached_block(hash_)
            if block is None:
                break
            blocks.append(block)
            hashes.append(hash_)
            parent = hash_
        return CachedPrefix(blocks, hashes)

    def allocate(self, request: Request, new_tokens: int, prefix: CachedPrefix = NO_CACHED_PREFIX) -> bool:
        """Blocks for `new_tokens` more tokens after the computed ones (and after `prefix`, a request's
        cached prefix at admission); False, changing nothing, when the free blocks do not suffice."""
        held = self._blocks.get(request.request_id, [])
        assert not (held and prefix.blocks), "a cached prefix is only taken by a request without blocks"
        computed = request.num_computed_tokens + prefix.block_count * self.block_tokens
        needed = self.blocks_for(computed + new_tokens) - len(held) - prefix.block_count
        # A cached block nobody references sits in the free queue: taking it as a prefix uses it up.
        free_in_prefix = sum(1 for block in prefix.blocks if self.pool.ref_count(block) == 0)
        if needed > self.pool.free_block_count - free_in_prefix:
            return False
        self.pool.touch(prefix.blocks)
        table = held + prefix.blocks + self.pool.take_new(max(needed, 0))
        self._blocks[request.request_id] = table
        self._hashes.setdefault(request.request_id, []).extend(prefix.hashes)
        assert len(table) * self.block_tokens >= computed + new_tokens, "block table too short for the step"
        return True

    def commit_computed(self, request: Request) -> None:
        """Register the request's full blocks whose keys and values are now all in the cache."""
        if not self.pool.caching:
            return
        table, hashes = self._blocks[request.request_id], self._hashes[request.request_id]
        full = request.num_computed_tokens // self.block_tokens
        if len(hashes) >= full:
            return
        tokens = request.all_token_ids()
        parent = hashes[-1] if hashes else ROOT_BLOCK_HASH
        for index in range(len(hashes), full):
            parent = block_hash(parent, tokens[index * self.block_tokens : (index + 1) * self.block_tokens])
            self.pool.cache(table[index], parent)
            hashes.append(parent)

    def free(self, request_id: str) -> None:
        """Drop the request's blocks; the last block goes first into the free queue (evicted first)."""
        table = self._blocks.pop(request_id, None)
        self._hashes.pop(request_id, None)
        if table is not None:
            self.pool.release(list(reversed(table)))
