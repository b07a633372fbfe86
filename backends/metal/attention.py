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
2. decode requests (one new token each) attend together: one gather of the
   slots of their padded block tables ``[n, L]`` and one masked
   ``mx.fast.scaled_dot_product_attention`` (GQA handled by MLX, K/V not tiled);
3. every other request attends on its own: causal SDPA over its new K/V when
   nothing is cached before it, otherwise causal SDPA (lower-right aligned)
   over its gathered context.

The gather (``gather_kv``) reads the cache by token slot, with the slot
indices built once per step on the host and shared by every layer (MLX
computes a shared lazy array once per evaluation), and writes its result
directly in SDPA's ``[B, Hkv, L, D]`` layout, row-contiguous: the one copy a
paged read needs without a custom kernel, where gathering whole blocks and
swapping axes made a strided view that SDPA's vector kernel copies again.

A layer's ``LayerAttention`` sets its scale, sliding window and soft-cap: a
windowed layer gathers only the blocks its window reaches and masks the keys
before it (the variant of a window is built the first time a layer with that
window asks, ``MetalAttentionMetadata.windowed``); a soft-capped layer
computes scores, ``cap * tanh(s / cap)``, mask and softmax explicitly.

MLX arrays are values: the cache write returns the new cache arrays, and the
backend keeps them for the next layer and step. Everything that does not
depend on the layer (indices, masks, the row order) is built once per step by
``metadata_from_inputs`` (from the persistent batch, ``backends.input_batch``;
``build_attention_metadata`` from plain lists). ``write_kv_cache`` and ``paged_attention`` have
the signatures of ``backends/cpu/attention.py``'s ``write_kv_cache_ref`` and
``paged_attention_ref``, which the tests compare them with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx
import numpy as np

from backends.base import StepRequest, step_requests
from backends.input_batch import StepInputs
from model.config import LayerAttention

KVCache = tuple[mx.array, mx.array]   # (k_cache, v_cache) of one layer


@dataclass
class DecodeBatch:
    """All decode requests of the step (one new token each), attended together."""

    rows: mx.array                    # [n] int32: rows of their tokens in the flattened batch
    slots: mx.array                   # [n, L] int32: cache slots of their keys, tables padded with block 0
    mask: mx.array                    # [n, 1, 1, num_blocks * block_size] bool: True = attend


@dataclass
class PrefillChunk:
    """One request with several new tokens, attended on its own."""

    query_start: int                  # first row of its tokens in the flattened batch
    query_end: int                    # one past its last row
    context_len: int                  # cached + new tokens
    slots: mx.array | None            # [context_len - key_start] int32 cache slots of its keys; None: plain causal
    mask: mx.array | None = None      # [q, context_len - key_start] bool (True = attend); None: causal
    key_start: int = 0                # position of the first gathered key (a block boundary)


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
    token_context_lens: mx.array | None = None    # [T] int32: each token's request context length (longrope)
    requests: list[StepRequest] = field(default_factory=list)   # the step's requests, in token order
    window: int | None = None                     # the sliding window this metadata is for
    gather_all: bool = False                      # every request reads its keys from the cache
    _windowed: dict = field(default_factory=dict, repr=False)   # window -> this step's metadata for it

    def windowed(self, window: int | None) -> "MetalAttentionMetadata":
        """This step's metadata for layers with sliding ``window`` (itself for None), built on first use."""
        if window == self.window:
            return self
        if window not in self._windowed:
            self._windowed[window] = _build(self.requests, self.slot_mapping, self.block_size, self.gather_all,
                                            window, self.token_context_lens)
        return self._windowed[window]


def build_attention_metadata(
    query_lens: Sequence[int],
    num_computed_tokens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    slot_mapping: Sequence[int],
    block_size: int,
    gather_all: bool = False,
    window: int | None = None,
) -> MetalAttentionMetadata:
    """Build the step's metadata from plain per-request lists (in token order).

    With ``gather_all`` every request reads its keys from the cache, even a
    prefill with nothing cached before it (``paged_attention``'s contract).
    ``window`` builds it for layers with that sliding window.
    """
    requests = list(step_requests(query_lens, num_computed_tokens, block_tables, slot_mapping, block_size))
    lens = np.repeat([r.context_len for r in requests], [r.query_len for r in requests]).astype(np.int32)
    return _build(requests, mx.array(np.asarray(slot_mapping, dtype=np.int32)), block_size, gather_all, window,
                  mx.array(lens))


def metadata_from_inputs(step: StepInputs, block_size: int, gather_all: bool = False) -> MetalAttentionMetadata:
    """The step's metadata from the persistent batch's arrays (``backends.input_batch``): no per-token lists.

    The same metadata as ``build_attention_metadata`` on the step's lists:
    each request's table is a row of the batch's block-table array.
    """
    tables = step.tables()                                                           # [R, W] int32
    requests = [StepRequest(start, q, c, c + q, nb, tables[i]) for i, (start, q, c, nb) in enumerate(zip(
        step.query_start_locs[:-1].tolist(), step.query_lens.tolist(), step.num_computed.tolist(),
        step.num_blocks.tolist()))]
    lens = np.repeat(step.context_lens, step.query_lens).astype(np.int32)             # [T]
    return _build(requests, mx.array(step.slot_mapping.astype(np.int32, copy=False)), block_size, gather_all,
                  None, mx.array(lens))


def _build(requests: list[StepRequest], slot_mapping: mx.array, block_size: int, gather_all: bool,
           window: int | None, token_context_lens: mx.array) -> MetalAttentionMetadata:
    decodes: list[tuple[int, int, Sequence[int]]] = []      # (row, context_len, table)
    prefills: list[PrefillChunk] = []
    for r in requests:
        if r.query_len == 1:
            decodes.append((r.start, r.context_len, r.table))
        elif window is not None and (r.num_computed or r.query_len > window):
            prefills.append(_windowed_chunk(r, block_size, window))
        else:
            slots = None
            if r.num_computed or gather_all:
                slots = mx.array(block_slots(r.table[:r.num_blocks], block_size)[:r.context_len])   # [L]
            prefills.append(PrefillChunk(r.start, r.start + r.query_len, r.context_len, slots))
    num_tokens = slot_mapping.shape[0]
    meta = MetalAttentionMetadata(
        slot_mapping=slot_mapping, block_size=block_size, num_tokens=num_tokens, prefills=prefills,
        token_context_lens=token_context_lens, requests=requests, window=window, gather_all=gather_all,
    )
    if decodes:
        meta.decode = _decode_batch(decodes, block_size, window)
    order = [row for row, _, _ in decodes]
    for chunk in prefills:
        order.extend(range(chunk.query_start, chunk.query_end))
    if order != list(range(num_tokens)):
        meta.restore_order = mx.array(np.argsort(np.asarray(order, dtype=np.int64)).astype(np.int32))  # [T]
    return meta


def _first_block(context_len: int, window: int | None, block_size: int) -> int:
    """The first block a query at position ``context_len - 1`` reads under ``window``."""
    return 0 if window is None else max(0, context_len - window) // block_size


def _windowed_chunk(r: StepRequest, block_size: int, window: int) -> PrefillChunk:
    """A chunk of a windowed layer: keys gathered from its first row's window, an explicit mask."""
    first = _first_block(r.num_computed + 1, window, block_size)
    key_start = first * block_size
    query_pos = np.arange(r.num_computed, r.context_len)[:, None]                    # [q, 1]
    key_pos = np.arange(key_start, r.context_len)[None, :]                          # [1, L]
    mask = (key_pos <= query_pos) & (key_pos > query_pos - window)                  # [q, L]
    slots = block_slots(r.table[first:r.num_blocks], block_size)[:r.context_len - key_start]    # [L]
    return PrefillChunk(r.start, r.start + r.query_len, r.context_len, mx.array(slots), mx.array(mask), key_start)


def _decode_batch(decodes: list[tuple[int, int, Sequence[int]]], block_size: int,
                  window: int | None = None) -> DecodeBatch:
    firsts = [_first_block(ctx, window, block_size) for _, ctx, _ in decodes]
    num_blocks = max(-(-ctx // block_size) - f for (_, ctx, _), f in zip(decodes, firsts))
    table = np.zeros((len(decodes), num_blocks), dtype=np.int32)                    # [n, nb]
    for i, ((_, ctx, t), f) in enumerate(zip(decodes, firsts)):
        n = -(-ctx // block_size)
        table[i, : n - f] = t[f:n]
    lens = np.asarray([ctx for _, ctx, _ in decodes])[:, None]                      # [n, 1]
    key_pos = np.asarray(firsts)[:, None] * block_size + np.arange(num_blocks * block_size)[None, :]  # [n, L]
    mask = key_pos < lens
    if window is not None:
        mask &= key_pos >= lens - window
    return DecodeBatch(
        rows=mx.array(np.asarray([row for row, _, _ in decodes], dtype=np.int32)),
        slots=mx.array(block_slots(table, block_size)),                            # [n, L]
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


def block_slots(block_ids, block_size: int) -> np.ndarray:
    """Cache slots of the tokens of ``block_ids`` (``[..., nb]``) in logical order: int32 ``[..., nb * block_size]``."""
    ids = np.asarray(block_ids, dtype=np.int32)
    slots = ids[..., None] * block_size + np.arange(block_size, dtype=np.int32)      # [..., nb, bs]
    return slots.reshape(*ids.shape[:-1], -1)                                       # [..., L]


def gather_kv(cache: mx.array, slots: mx.array) -> mx.array:
    """The keys (or values) at ``slots`` (``[..., L]``), written contiguous as ``[..., Hkv, L, D]``.

    One gather with two broadcast indices (slot ``[..., 1, L]``, head
    ``[Hkv, 1]``), so the result is laid out for SDPA with no second copy.
    """
    num_kv_heads = cache.shape[2]
    flat = cache.reshape(-1, num_kv_heads, cache.shape[3])                          # [S, Hkv, D]
    heads = mx.arange(num_kv_heads, dtype=mx.int32)[:, None]                        # [Hkv, 1]
    return flat[slots[..., None, :], heads]                                         # [..., Hkv, L, D]


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
                metadata: MetalAttentionMetadata, layer: LayerAttention | None = None) -> tuple[mx.array, KVCache]:
        """Write K/V of the step, then attend; returns ``[T, H, D]`` and the new ``(k_cache, v_cache)``.

        ``q`` is ``[T, H, D]``, ``k`` and ``v`` are ``[T, Hkv, D]`` (RoPE applied); ``layer`` is the
        layer's scale, window and soft-cap (None: this instance's scale, full attention, no cap).
        """
        k_cache, v_cache = write_kv_cache(*kv_cache, k, v, metadata.slot_mapping)
        return self.attend(q, k, v, k_cache, v_cache, metadata, layer), (k_cache, v_cache)

    def attend(self, q: mx.array, k: mx.array | None, v: mx.array | None, k_cache: mx.array,
               v_cache: mx.array, metadata: MetalAttentionMetadata, layer: LayerAttention | None = None) -> mx.array:
        """Attention of every new token over its context ``[T, H, D]``; the cache already holds the step's K/V.

        ``k``/``v`` are read only by prefills without a cached prefix (``slots`` None).
        """
        layer = layer or LayerAttention(self.scale)
        metadata = metadata.windowed(layer.window)
        pieces = []
        if metadata.decode is not None:
            pieces.append(self._decode(q, k_cache, v_cache, metadata.decode, layer))   # [n, H, D]
        for chunk in metadata.prefills:
            s, e = chunk.query_start, chunk.query_end
            new_k = None if chunk.slots is not None else k[s:e]
            new_v = None if chunk.slots is not None else v[s:e]
            pieces.append(self._prefill(q[s:e], new_k, new_v, k_cache, v_cache, chunk, layer))  # [q, H, D]
        out = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=0)      # [T, H, D]
        if metadata.restore_order is not None:
            out = out[metadata.restore_order]                                        # [T, H, D]
        return out

    def _decode(self, q: mx.array, k_cache: mx.array, v_cache: mx.array, batch: DecodeBatch,
                layer: LayerAttention) -> mx.array:
        queries = q[batch.rows][:, :, None, :]                                      # [n, H, 1, D]
        keys = gather_kv(k_cache, batch.slots)                                      # [n, Hkv, L, D]
        values = gather_kv(v_cache, batch.slots)                                    # [n, Hkv, L, D]
        out = sdpa(queries, keys, values, layer.scale, batch.mask, layer.softcap)   # [n, H, 1, D]
        return out[:, :, 0, :]                                                      # [n, H, D]

    def _prefill(self, q: mx.array, k: mx.array | None, v: mx.array | None, k_cache: mx.array, v_cache: mx.array,
                 chunk: PrefillChunk, layer: LayerAttention) -> mx.array:
        queries = mx.swapaxes(q, 0, 1)[None]                                        # [1, H, q, D]
        if chunk.slots is None:
            keys = mx.swapaxes(k, 0, 1)[None]                                       # [1, Hkv, q, D]
            values = mx.swapaxes(v, 0, 1)[None]                                     # [1, Hkv, q, D]
        else:
            keys = gather_kv(k_cache, chunk.slots)[None]                            # [1, Hkv, L, D]
            values = gather_kv(v_cache, chunk.slots)[None]                          # [1, Hkv, L, D]
        mask = "causal" if chunk.mask is None else chunk.mask
        out = sdpa(queries, keys, values, layer.scale, mask, layer.softcap)         # [1, H, q, D]
        return mx.swapaxes(out[0], 0, 1)                                            # [q, H, D]


def sdpa(q: mx.array, k: mx.array, v: mx.array, scale: float, mask, softcap: float | None = None) -> mx.array:
    """Attention of ``q`` ``[B, H, Lq, D]`` over ``k``/``v`` ``[B, Hkv, Lk, D]``; ``mask`` bool or "causal".

    Without ``softcap``: ``mx.fast.scaled_dot_product_attention``; with it the
    scores are capped explicitly in transformers' order (scale, cap, mask,
    float32 softmax). A causal mask is lower-right aligned (the queries are
    the last positions).
    """
    if softcap is None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if q.shape[1] != k.shape[1]:
        k = mx.repeat(k, q.shape[1] // k.shape[1], axis=1)                          # [B, H, Lk, D]
        v = mx.repeat(v, q.shape[1] // v.shape[1], axis=1)                          # [B, H, Lk, D]
    scores = (q @ mx.swapaxes(k, -1, -2)) * scale                                   # [B, H, Lq, Lk]
    scores = mx.tanh(scores / softcap) * softcap
    if isinstance(mask, str):
        lq, lk = scores.shape[-2:]
        mask = mx.arange(lk)[None, :] <= mx.arange(lk - lq, lk)[:, None]            # [Lq, Lk]
    scores = mx.where(mask, scores, mx.array(-float("inf"), dtype=scores.dtype))
    probs = mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype)          # [B, H, Lq, Lk]
    return probs @ v                                                                # [B, H, Lq, D]


def paged_attention(
    q: mx.array,
    k_cache: mx.array,
    v_cache: mx.array,
    block_tables: Sequence[Sequence[int]],
    context_lens: Sequence[int],
    query_start_locs: Sequence[int],
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> mx.array:
    """``paged_attention_ref``'s contract through ``MetalAttention``'s read path (no cache write).

    ``q`` is ``[T, H, D]``; request ``r`` owns rows ``query_start_locs[r] ..
    query_start_locs[r+1]-1``, the LAST positions of its ``context_lens[r]``
    tokens, all of which must already be in the cache; ``window`` and
    ``softcap`` as ``LayerAttention``'s. Returns ``[T, H, D]``.
    """
    starts = [int(s) for s in query_start_locs]
    query_lens = [b - a for a, b in zip(starts, starts[1:])]
    lens = [int(c) for c in context_lens]
    num_computed = [c - n for c, n in zip(lens, query_lens)]
    unused_slots = [0] * sum(query_lens)                                            # nothing is written
    meta = build_attention_metadata(query_lens, num_computed, [list(t) for t in block_tables], unused_slots,
                                    k_cache.shape[1], gather_all=True)
    attention = MetalAttention(q.shape[1], k_cache.shape[2], q.shape[2], scale)
    layer = LayerAttention(scale, window, softcap)
    return attention.attend(q, None, None, k_cache, v_cache, meta, layer)           # [T, H, D]
