"""Which blocks belong to which request, with automatic prefix caching.

A request's block table maps its logical blocks to physical ones::

    tokens:       [ 0 .. 15 | 16 .. 31 | 32 .. 37 ]      block_size = 16
    block_table:  [   7     |    2     |    9     ]      9 is partly filled

Full blocks are registered under a hash chained over the tokens before them
(``Request.block_hashes``) as soon as the step that computes them is
scheduled, so a request admitted later in the same step, or any later step,
finds them: it takes references and skips computing those tokens. Blocks are
only kept in the cache once their K/V was actually computed: a request freed
before its step ran gives its uncomputed blocks back unhashed.

Besides the ``KVBlock`` objects, each request has a live list of its block
ids (``block_ids``) that the scheduler hands to backends by reference
(``scheduler.output``): it only grows while the request holds its blocks, and
is dropped, never reused, when they are freed.
"""

from __future__ import annotations

from scheduler.block_pool import BlockPool, KVBlock
from scheduler.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self._blocks: dict[str, list[KVBlock]] = {}       # request id -> block table
        self._block_ids: dict[str, list[int]] = {}        # request id -> its block ids (append-only, live)
        self._num_cached: dict[str, int] = {}             # request id -> leading blocks registered
        self.prefix_cache_queries = 0                     # tokens looked up
        self.prefix_cache_hits = 0                        # tokens found

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def get_block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block ids ([] when it holds none)."""
        return list(self._block_ids.get(request_id, ()))

    @property
    def live_block_ids(self) -> dict[str, list[int]]:
        """Request id -> its live block-id list (see ``block_ids``); read-only for callers."""
        return self._block_ids

    def block_ids(self, request_id: str) -> list[int]:
        """The request's live block-id list itself (no copy): append-only while it
        holds its blocks; callers must not modify it."""
        return self._block_ids[request_id]

    def num_blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of ``request``, as blocks and a token count.

        At least the last token is always left to compute, so the request
        gets logits to sample from. Takes no references (see allocate_slots).
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[KVBlock] = ()
    ) -> list[KVBlock] | None:
        """Make room for ``num_new_tokens`` more tokens of ``request``.

        ``new_computed_blocks`` are prefix-cache hits from ``get_computed_blocks``
        (only when the request is being admitted). Returns the newly allocated
        blocks, or None, changing nothing, when the pool is too short.
        """
        rid = request.request_id
        blocks = self._blocks.get(rid)
        if blocks is None:
            blocks = self._blocks[rid] = []
            self._block_ids[rid] = []
        bs = self.block_size
        if not new_computed_blocks:
            total = request.num_computed_tokens + num_new_tokens
            if total <= len(blocks) * bs:                 # fits the blocks it has (most decode steps)
                if self.enable_prefix_caching and total // bs > self._num_cached.get(rid, 0):
                    self._cache_full_blocks(request, total // bs)
                return []
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * bs
        num_needed = self.num_blocks_needed(num_computed + num_new_tokens) - len(blocks) - len(new_computed_blocks)
        # Hits that sit in the free queue count against the free blocks.
        num_revived = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_revived:
            if not blocks:
                del self._blocks[rid], self._block_ids[rid]
            return None
        ids = self._block_ids[rid]
        if new_computed_blocks:
            self.pool.touch(list(new_computed_blocks))
            blocks.extend(new_computed_blocks)
            ids.extend(b.block_id for b in new_computed_blocks)
            self._num_cached[rid] = len(blocks)
        new_blocks = self.pool.allocate(max(num_needed, 0)) or []
        blocks.extend(new_blocks)
        ids.extend(b.block_id for b in new_blocks)
        if self.enable_prefix_caching:
            self._cache_full_blocks(request, (num_computed + num_new_tokens) // bs)
        return new_blocks

    def _cache_full_blocks(self, request: Request, num_full_blocks: int) -> None:
        rid = request.request_id
        blocks = self._blocks[rid]
        start = self._num_cached.get(rid, 0)
        end = min(num_full_blocks, len(request.block_hashes))
        for i in range(start, end):
            self.pool.cache_block(blocks[i], request.block_hashes[i])
        self._num_cached[rid] = max(start, end)

    def free(self, request: Request) -> None:
        """Give back all blocks of ``request`` (finished, aborted or preempted).

        Blocks whose tokens were not all computed (``num_computed_tokens``)
        lose their hash before they return to the pool.
        """
        blocks = self._blocks.pop(request.request_id, None)
        self._block_ids.pop(request.request_id, None)     # dropped, not cleared: a backend may still hold it
        self._num_cached.pop(request.request_id, None)
        if not blocks:
            return
        first_uncomputed = request.num_computed_tokens // self.block_size
        for block in blocks[first_uncomputed:]:
            if block.ref_cnt == 1:
                self.pool.uncache_block(block)
        self.pool.free(list(reversed(blocks)))

    def reset_prefix_cache(self) -> int:
        return self.pool.reset_prefix_cache()
