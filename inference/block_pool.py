"""The paged KV cache's blocks: a free-block pool with reference counts and a prefix cache (vLLM v1's
BlockPool).

A block holds the keys and values of `block_tokens` consecutive tokens of one sequence. A full block
whose tokens are known is identified by `block_hash(parent, tokens)`: a digest of its tokens chained with
the digest of the prefix before it, so equal hashes mean equal prefixes, token for token. Such a block
can be shared by every request whose prompt starts with that prefix (its reference count says by how
many). A block nobody references goes back to the free queue but keeps its hash: a later request with the
same prefix takes it back from there (a cache hit); a request that needs a fresh block takes the least
recently freed one, and if that block was cached its hash is forgotten (LRU eviction).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

BLOCK_HASH_BYTES = 16  # blake2b digest size: collisions are out of reach, so a hash match is a token match
ROOT_BLOCK_HASH = b""  # the parent of a sequence's first block


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """The identity of a full block: its tokens and, through `parent`, every token before it."""
    digest = hashlib.blake2b(parent, digest_size=BLOCK_HASH_BYTES)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockPool:
    """`block_count` blocks; each is free (in the LRU free queue, maybe still cached) or referenced."""

    def __init__(self, block_count: int, caching: bool) -> None:
        assert block_count > 0, "a pool needs at least one block"
        self.block_count = block_count
        self.caching = caching
        self._ref_counts = [0] * block_count
        self._hashes: list[bytes | None] = [None] * block_count
        self._cached: dict[bytes, int] = {}  # block hash -> the block that holds it
        # Free blocks, least recently freed first (evicted first); the values are unused.
        self._free: OrderedDict[int, None] = OrderedDict((block, None) for block in range(block_count))

    @property
    def free_block_count(self) -> int:
        """Blocks a request can take now: unreferenced ones, cached or not."""
        return len(self._free)

    @property
    def cached_block_count(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        """The fraction of blocks referenced by a request (vLLM's kv_cache_usage_perc, as 0..1)."""
        return 1.0 - len(self._free) / self.block_count

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def cached_block(self, hash_: bytes) -> int | None:
        return self._cached.get(hash_) if self.caching else None

    def take_new(self, count: int) -> list[int]:
        """`count` fresh blocks (referenced once), evicting the least recently freed cached ones."""
        assert count <= len(self._free), f"take_new({count}) with {len(self._free)} free blocks"
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            hash_ = self._hashes[block]
            if hash_ is not None:
                del self._cached[hash_]  # evicted: its contents are about to be overwritten
                self._hashes[block] = None
            assert self._ref_counts[block] == 0, f"free block {block} is referenced"
            self._ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: list[int]) -> None:
        """Reference cached blocks once more (a prefix hit); a free one leaves the free queue."""
        for block in blocks:
            assert self._hashes[block] is not None, f"block {block} is not cached"
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block, in order: the first freed is the first evicted."""
        for block in blocks:
            assert self._ref_counts[block] > 0, f"block {block} released more often than referenced"
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None

    def cache(self, block: int, hash_: bytes) -> None:
        """Register a full, computed block under its hash (unless another block already holds it)."""
        if not self.caching or hash_ in self._cached or self._hashes[block] is not None:
            return
        assert self._ref_counts[block] > 0, "only a block in use is registered"
        self._cached[hash_] = block
        self._hashes[block] = hash_
