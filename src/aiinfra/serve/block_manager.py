"""The paged KV cache's bookkeeping: fixed-size blocks, a block table per request, ref-counted prefix caching.

Pure Python, no torch: the model runner owns the tensors and only ever sees block ids. A block is a run of
`block_size` token slots. A full block is keyed by a hash chained over the previous block's hash and its own
token ids, so two prompts that share a prefix share its blocks (their ref count says how many requests hold them).
A freed block keeps its hash and stays findable until it is handed out again, oldest freed first (LRU).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence


def block_hash(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """A stable hash of one full block, chained over its parent's hash so equal blocks at different prefixes differ."""
    digest = hashlib.blake2b(parent_hash or b"", digest_size=16)
    digest.update(b"".join(int(token).to_bytes(4, "little") for token in token_ids))
    return digest.digest()


class BlockManager:
    """Hands out KV blocks to requests, or says no (the scheduler then preempts)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks}, block_size={block_size}: both must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks
        # Free blocks in eviction order (oldest first); an OrderedDict gives O(1) removal on a prefix-cache hit.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.tables: dict[str, list[int]] = {}
        self.hashed_counts: dict[str, int] = {}  # full blocks of each request already entered in the cache
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Share of blocks held by live requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Block ids holding the longest cached run of full blocks at the start of `token_ids`."""
        if not self.enable_prefix_caching:
            return []
        found: list[int] = []
        parent: bytes | None = None
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            parent = block_hash(parent, token_ids[start : start + self.block_size])
            block_id = self.cached.get(parent)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def allocate(self, request_id: str, num_tokens: int, cached_blocks: Sequence[int] = ()) -> bool:
        """Grow `request_id`'s table to hold `num_tokens` slots, first taking `cached_blocks` (new requests only).

        Returns False, changing nothing, when there are not enough free blocks.
        """
        table = self.tables.get(request_id, [])
        reused_free = sum(1 for block_id in cached_blocks if self.ref_counts[block_id] == 0)
        fresh = max(0, self.blocks_needed(num_tokens) - len(table) - len(cached_blocks))
        if fresh + reused_free > len(self.free_blocks):
            return False
        if request_id not in self.tables:
            self.tables[request_id] = table
            self.hashed_counts[request_id] = len(cached_blocks)
        for block_id in cached_blocks:
            if self.ref_counts[block_id] == 0:
                del self.free_blocks[block_id]
            self.ref_counts[block_id] += 1
            table.append(block_id)
        for _ in range(fresh):
            block_id, _ = self.free_blocks.popitem(last=False)
            stale = self.hashes[block_id]
            if stale is not None:  # evict the old content from the prefix cache
                if self.cached.get(stale) == block_id:
                    del self.cached[stale]
                self.hashes[block_id] = None
            self.ref_counts[block_id] = 1
            table.append(block_id)
        return True

    def has_new_full_blocks(self, request_id: str, num_computed_tokens: int) -> bool:
        """Whether `cache_full_blocks` has anything to do (cheap, so callers skip building the token list)."""
        return self.enable_prefix_caching and num_computed_tokens // self.block_size > self.hashed_counts.get(
            request_id, num_computed_tokens
        )

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Enter the request's newly filled blocks (their KV is computed) into the prefix cache."""
        if not self.enable_prefix_caching or request_id not in self.tables:
            return
        table = self.tables[request_id]
        done = self.hashed_counts[request_id]
        full = min(num_computed_tokens // self.block_size, len(table))
        parent = self.hashes[table[done - 1]] if done else None
        for index in range(done, full):
            parent = block_hash(parent, token_ids[index * self.block_size : (index + 1) * self.block_size])
            block_id = table[index]
            self.hashes[block_id] = parent
            # A concurrent twin may have cached the same content first; keep that one as the canonical block.
            self.cached.setdefault(parent, block_id)
        self.hashed_counts[request_id] = max(done, full)

    def free(self, request_id: str) -> None:
        """Release all of a request's blocks; blocks nobody else holds return to the free list (tail first)."""
        table = self.tables.pop(request_id, [])
        self.hashed_counts.pop(request_id, None)
        # Later blocks of a sequence are less likely to be shared, so they are evicted before its earlier ones.
        for block_id in reversed(table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_blocks[block_id] = None

    def block_table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])
