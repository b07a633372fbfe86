"""Paged attention in MLX: cache write through the slot mapping, gather through the block table.

KV cache of one layer (the layout every backend shares)::

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot s  <->  k_cache.reshape(-1, num_kv_heads, head_dim)[s]
    slot of position p of a request = block_table[p // block_size] * block_size + p % block_size

Per layer, ``MetalAttention.forward``:

1. writes K/V of ALL new tokens of the step into their slots (one scatter per
   cache; MLX reuses the cache's buffer because nothing else holds it), before
   any request attends: a request may read blocks another request of the same
   step has just written (shared prefix blocks);
2. decode requests (one new token each) attend together: one gather of their
   padded block tables ``[n, num_blocks]`` and one masked
   ``mx.fast.scaled_dot_product_attention`` (GQA handled by MLX, K/V not tiled);
3. every other request attends on its own: causal SDPA over its new K/V when
   nothing is cached before it, otherwise causal SDPA (lower-right aligned)
   over its gathered context.

MLX arrays are values: the cache write returns the new cache arrays, and the
backend keeps them for the next layer and step. Everything that does not
depend on the layer (indices, masks, the row order) is built once per step by
``build_attention_metadata``. ``write_kv_cache`` and ``paged_attention`` have
the signatures of ``backends/cpu/attention.py``'s ``write_kv_cache_ref`` and
``paged_attention_ref``, which the tests compare them with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx
import numpy as np

from backends.base import step_requests

KVCache = tuple[mx.array, mx.array]   # (k_cache, v_cache) of one layer


@dataclass
class DecodeBatch:
    """All decode requests of the step (one new token each), attended together."""

    rows: mx.array                    # [n] int32: rows of their tokens in the flattened batch
    block_ids: mx.array               # [n, num_blocks] int32: block tables, padded with block 0
    mask: mx.array                    # [n, 1, 1, num_blocks * block_size] bool: True = attend


@dataclass
class PrefillChunk:
    """One request with several new tokens, attended on its own."""

    query_start: int                  # first row of its tokens in the flattened batch
    query_end: int                    # one past its last row
    context_len: int                  # cached + new tokens
    block_ids: mx.array | None        # [num_ctx_blocks] int32; None: no cached prefix (plain causal)


@dataclass
class MetalAttentionMetadata:
    """Per-step inputs of ``MetalAttention``, shared by all layers."""

    slot_mapping: mx.array                        # [T] int32: cache slot of each new token
    block_size: int
    num_tokens: int
    decode: DecodeBatch | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    # Outputs are computed decode batch first, then the prefills in order; this
    # [T] int32 permutation puts them back in token order (None: already are).
    restore_order: mx.array | None = None


def build_attention_metadata(
    query_lens: Sequence[int],
    num_computed_tokens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    slot_mapping: Sequence[int],
    block_size: int,
    gather_all: bool = False,
) -> MetalAttentionMetadata:
    """Build the step's metadata from plain per-request lists (in token order).

    With ``gather_all`` every request reads its keys from the cache, even a
    prefill with nothing cached before it (``paged_attention``'s contract).
    """
    decodes: list[tuple[int, int, Sequence[int]]] = []      # (row, context_len, table)
    prefills: list[PrefillChunk] = []
    for r in step_requests(query_lens, num_computed_tokens, block_tables, slot_mapping, block_size):
        if r.query_len == 1:
            decodes.append((r.start, r.context_len, r.table))
        else:
            block_ids = None
            if r.num_computed or gather_all:
                block_ids = mx.array(np.asarray(r.table[:r.num_blocks], dtype=np.int32))   # [nb]
            prefills.append(PrefillChunk(r.start, r.start + r.query_len, r.context_len, block_ids))
    num_tokens = len(slot_mapping)
    meta = MetalAttentionMetadata(
        slot_mapping=mx.array(np.asarray(slot_mapping, dtype=np.int32)), block_size=block_size,
        num_tokens=num_tokens, prefills=prefills,
    )
    if decodes:
        meta.decode = _decode_batch(decodes, block_size)
    order = [row for row, _, _ in decodes]
    for chunk in prefills:
        order.extend(range(chunk.query_start, chunk.query_end))
    if order != list(range(num_tokens)):
        meta.restore_order = mx.array(np.argsort(np.asarray(order, dtype=np.int64)).astype(np.int32))  # [T]
    return meta


def _decode_batch(decodes: list[tuple[int, int, Sequence[int]]], block_size: int) -> DecodeBatch:
    num_blocks = max(-(-ctx // block_size) for _, ctx, _ in decodes)
    table = np.zeros((len(decodes), num_blocks), dtype=np.int32)                    # [n, nb]
    for i, (_, ctx, t) in enumerate(decodes):
        n = -(-ctx // block_size)
        table[i, :n] = t[:n]
    lens = np.asarray([ctx for _, ctx, _ in decodes])                               # [n]
    mask = np.arange(num_blocks * block_size)[None, :] < lens[:, None]             # [n, L]
    return DecodeBatch(
        rows=mx.array(np.asarray([row for row, _, _ in decodes], dtype=np.int32)),
        block_ids=mx.array(table),
        mask=mx.array(mask[:, None, None, :]),                                      # [n, 1, 1, L]
    )


def write_kv_cache(k_cache: mx.array, v_cache: mx.array, k: mx.array, v: mx.array,
                   slot_mapping: Sequence[int] | mx.array) -> KVCache:
    """Token ``i``'s ``k[i]``/``v[i]`` ``[Hkv, D]`` go to slot ``slot_mapping[i]``; returns the new caches."""
    if not isinstance(slot_mapping, mx.array):
        slot_mapping = mx.array(np.asarray(slot_mapping, dtype=np.int32))
    shape = k_cache.shape
    k_flat = k_cache.reshape(-1, *shape[2:])                                        # [S, Hkv, D]
    v_flat = v_cache.reshape(-1, *shape[2:])                                        # [S, Hkv, D]
    k_flat[slot_mapping] = k.astype(k_cache.dtype)
    v_flat[slot_mapping] = v.astype(v_cache.dtype)
    return k_flat.reshape(shape), v_flat.reshape(shape)


def gather_kv(cache: mx.array, block_ids: mx.array) -> mx.array:
    """The tokens of ``block_ids`` (``[..., nb]``) in logical order: ``[..., Hkv, nb * block_size, D]``."""
    blocks = cache[block_ids]                                                       # [..., nb, bs, Hkv, D]
    lead = block_ids.shape[:-1]
    tokens = blocks.reshape(*lead, -1, *cache.shape[2:])                            # [..., L, Hkv, D]
    return mx.swapaxes(tokens, -3, -2)                                              # [..., Hkv, L, D]


class MetalAttention:
    """Paged attention over the flattened tokens of one step (see the module docstring)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None) -> None:
        if num_heads % num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale

    def forward(self, q: mx.array, k: mx.array, v: mx.array, kv_cache: KVCache,
                metadata: MetalAttentionMetadata) -> tuple[mx.array, KVCache]:
        """Write K/V of the step, then attend; returns ``[T, H, D]`` and the new ``(k_cache, v_cache)``.

        ``q`` is ``[T, H, D]``, ``k`` and ``v`` are ``[T, Hkv, D]`` (RoPE applied).
        """
        k_cache, v_cache = write_kv_cache(*kv_cache, k, v, metadata.slot_mapping)
        return self.attend(q, k, v, k_cache, v_cache, metadata), (k_cache, v_cache)

    def attend(self, q: mx.array, k: mx.array | None, v: mx.array | None, k_cache: mx.array,
               v_cache: mx.array, metadata: MetalAttentionMetadata) -> mx.array:
        """Attention of every new token over its context ``[T, H, D]``; the cache already holds the step's K/V.

        ``k``/``v`` are read only by prefills without a cached prefix (``block_ids`` None).
        """
        pieces = []
        if metadata.decode is not None:
            pieces.append(self._decode(q, k_cache, v_cache, metadata.decode))          # [n, H, D]
        for chunk in metadata.prefills:
            s, e = chunk.query_start, chunk.query_end
            new_k = None if chunk.block_ids is not None else k[s:e]
            new_v = None if chunk.block_ids is not None else v[s:e]
            pieces.append(self._prefill(q[s:e], new_k, new_v, k_cache, v_cache, chunk))  # [q, H, D]
        out = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=0)      # [T, H, D]
        if metadata.restore_order is not None:
            out = out[metadata.restore_order]                                        # [T, H, D]
        return out

    def _decode(self, q: mx.array, k_cache: mx.array, v_cache: mx.array, batch: DecodeBatch) -> mx.array:
        queries = q[batch.rows][:, :, None, :]                                      # [n, H, 1, D]
        keys = gather_kv(k_cache, batch.block_ids)                                  # [n, Hkv, L, D]
        values = gather_kv(v_cache, batch.block_ids)                                # [n, Hkv, L, D]
        out = mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=self.scale, mask=batch.mask)               # [n, H, 1, D]
        return out[:, :, 0, :]                                                      # [n, H, D]

    def _prefill(self, q: mx.array, k: mx.array | None, v: mx.array | None, k_cache: mx.array, v_cache: mx.array,
                 chunk: PrefillChunk) -> mx.array:
        queries = mx.swapaxes(q, 0, 1)[None]                                        # [1, H, q, D]
        if chunk.block_ids is None:
            keys = mx.swapaxes(k, 0, 1)[None]                                       # [1, Hkv, q, D]
            values = mx.swapaxes(v, 0, 1)[None]                                     # [1, Hkv, q, D]
        else:
            n = chunk.context_len
            keys = gather_kv(k_cache, chunk.block_ids)[None, :, :n]                 # [1, Hkv, ctx, D]
            values = gather_kv(v_cache, chunk.block_ids)[None, :, :n]               # [1, Hkv, ctx, D]
        out = mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=self.scale, mask="causal")                 # [1, H, q, D]
        return mx.swapaxes(out[0], 0, 1)                                            # [q, H, D]


def paged_attention(
    q: mx.array,
    k_cache: mx.array,
    v_cache: mx.array,
    block_tables: Sequence[Sequence[int]],
    context_lens: Sequence[int],
    query_start_locs: Sequence[int],
    scale: float,
) -> mx.array:
    """``paged_attention_ref``'s contract through ``MetalAttention``'s read path (no cache write).

    ``q`` is ``[T, H, D]``; request ``r`` owns rows ``query_start_locs[r] ..
    query_start_locs[r+1]-1``, the LAST positions of its ``context_lens[r]``
    tokens, all of which must already be in the cache. Returns ``[T, H, D]``.
    """
    starts = [int(s) for s in query_start_locs]
    query_lens = [b - a for a, b in zip(starts, starts[1:])]
    lens = [int(c) for c in context_lens]
    num_computed = [c - n for c, n in zip(lens, query_lens)]
    unused_slots = [0] * sum(query_lens)                                            # nothing is written
    meta = build_attention_metadata(query_lens, num_computed, [list(t) for t in block_tables], unused_slots,
                                    k_cache.shape[1], gather_all=True)
    attention = MetalAttention(q.shape[1], k_cache.shape[2], q.shape[2], scale)
    return attention.attend(q, None, None, k_cache, v_cache, meta)                  # [T, H, D]
