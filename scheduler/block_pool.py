"""The pool of physical KV blocks: ref counts, free queues, prefix-cache table.

Every block is in exactly one of three places::

    in use          ref_cnt > 0, owned by one or more requests
    free, unhashed  ref_cnt == 0, no cached content      -> reused first (FIFO)
    free, cached    ref_cnt == 0, content known by hash  -> reused LRU, hash evicted then

A cached free block can be revived by a prefix-cache hit (``touch``), which
takes it out of the free queue without losing its content. Misuse (freeing
a free block) raises; running out is not an error: ``allocate`` returns None.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None     # set once the block is full and registered in the cache

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free_unhashed: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()    # oldest (LRU) first
        self._cached: dict[bytes, KVBlock] = {}                       # hash -> block
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no owner, cached or not (all of them can be allocated)."""
        return len(self._free_unhashed) + len(self._free_cached)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash)

    def allocate(self, num_blocks: int) -> list[KVBlock] | None:
        """Take ``num_blocks`` fresh blocks (ref count 1), or None if too few are free."""
        if num_blocks > self.num_free_blocks:
            return None
        out = []
        for _ in range(num_blocks):
            if self._free_unhashed:
                block_id, _ = self._free_unhashed.popitem(last=False)
                block = self.blocks[block_id]
            else:
                block_id, _ = self._free_cached.popitem(last=False)
                block = self.blocks[block_id]
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take one more reference on each block (a prefix-cache hit)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self._free_cached.pop(block.block_id)
            block.ref_cnt += 1

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference on each block, in the given order.

        Blocks reaching ref count 0 join the tail of their free queue, so pass
        a request's blocks in reverse to have its tail blocks evicted first.
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is not None:
                    self._free_cached[block.block_id] = None
                else:
                    self._free_unhashed[block.block_id] = None

    def cache_block(self, block: KVBlock, block_hash: bytes) -> bool:
        """Register a full, owned block under ``block_hash``.

        Returns False when another block already holds this content (two
        requests computed the same prefix at once): this one stays unhashed.
        """
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block.ref_cnt <= 0:
            raise RuntimeError(f"cannot cache free block {block.block_id}")
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return True

    def uncache_block(self, block: KVBlock) -> None:
        """Forget an owned block's content (its K/V was never fully computed)."""
        if block.block_hash is not None:
            if block.ref_cnt == 0:
                raise RuntimeError(f"uncache of free block {block.block_id}")
            del self._cached[block.block_hash]
            block.block_hash = None

    def reset_prefix_cache(self) -> int:
        """Evict every free cached block; returns how many were evicted."""
        n = 0
        while self._free_cached:
            block_id, _ = self._free_cached.popitem(last=False)
            self._evict(self.blocks[block_id])
            self._free_unhashed[block_id] = None
            n += 1
        return n

    def _evict(self, block: KVBlock) -> None:
        del self._cached[block.block_hash]
        block.block_hash = None
        self.num_evictions += 1
