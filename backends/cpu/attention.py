"""Gather-based paged attention on CPU: the oracle every kernel is tested against.

Per layer, ``CPUAttention.forward``:

1. writes K/V of ALL new tokens of the step into their cache slots
   (``index_copy_`` on the flattened ``[num_blocks * block_size, Hkv, D]``
   view), before any request attends: a request may read blocks another
   request of the same step has just written (shared prefix blocks); on a
   decode-only step served by the native kernel, the kernel does this write
   itself, in the same order (all rows, then the attention);
2. decode requests (one new token) attend through the native kernel of
   ``backends/cpu/native`` when it could be built (float32): it reads each
   request's blocks in place, with no gather copy. ``native_decode_inputs``
   hands a decode-only step's slots and tables to a model whose native
   layers do the write and the attention inside their one call per layer
   (``backends.cpu.native.layer``). Otherwise decodes attend in
   groups: one padded gather of their blocks into a reused workspace and one
   masked SDPA per group, the query heads of each KV head folded into the
   query axis (GQA without copying K/V). Groups are sized so the gathered K/V
   stay in the CPU cache until SDPA reads them (a single group for small
   batches);
3. every other request (prefill, chunked prefill) attends on its own: causal
   SDPA over its new K/V when nothing is cached before it, otherwise a masked
   SDPA over its gathered context.

A layer's ``LayerAttention`` sets its scale, sliding window and soft-cap. A
windowed layer (a query at ``p`` sees keys ``p - window + 1 .. p``) gathers
only the blocks its window reaches, with masks that also cut the keys before
it; a soft-capped layer computes scores, ``cap * tanh(s / cap)``, mask and
softmax explicitly (SDPA has no cap). Everything that does not depend on the
layer (gather indices, masks, query ranges) is built once per step in
``backends.cpu.attention_metadata`` (``metadata_from_inputs`` from a
persistent batch's arrays, ``build_attention_metadata`` from plain lists);
the variant of a window is built the first time a layer with that window
asks (``CPUAttentionMetadata.windowed``).

``write_kv_cache_ref`` and ``paged_attention_ref`` are plain-loop references
with the signatures future kernels must match.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from backends.cpu.attention_metadata import (  # noqa: F401 - build_attention_metadata et al. re-exported
    DEFAULT_MAX_GATHER_TOKENS, GATHER_BUDGET_BYTES, MAX_MASK_ELEMENTS, CPUAttentionMetadata, DecodeGroup,
    NativeDecode, PrefillChunk, additive_mask, build_attention_metadata, metadata_from_inputs)
from backends.cpu.native import rows_of_heads
from backends.input_batch import StepInputs
from model.config import LayerAttention


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
           is_causal: bool = False, softcap: float | None = None) -> torch.Tensor:
    """SDPA of ``q`` ``[B, H, Lq, D]`` over ``k``/``v`` ``[B, Hkv, Lk, D]`` (GQA when H > Hkv).

    Without ``softcap`` this is ``F.scaled_dot_product_attention``; with it the
    scores are capped explicitly in the order transformers uses (scale, cap,
    mask, float32 softmax). ``mask`` is additive ``[..., Lq, Lk]``.
    """
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    if q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)                         # [B, H, Lk, D]
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)                         # [B, H, Lk, D]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale                                # [B, H, Lq, Lk]
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        lq, lk = scores.shape[-2:]
        mask = additive_mask(torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq), scores.dtype)
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)              # [B, H, Lq, Lk]
    return torch.matmul(probs, v)                                                        # [B, H, Lq, D]


class CPUAttention:
    """``AttentionBackend`` for the cpu backend (see the module docstring).

    Owns a gather workspace reused by every layer and step (fresh large
    allocations would page-fault on every layer). ``use_native_kernel``:
    None uses the native decode kernel where it is available and fits (float32,
    the head shape), False never.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 dtype: torch.dtype = torch.float32, max_gather_tokens: int | None = None,
                 use_native_kernel: bool | None = None) -> None:
        if num_heads % num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if max_gather_tokens is None:
            token_bytes = num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
            max_gather_tokens = max(1, GATHER_BUDGET_BYTES // token_bytes)
        if max_gather_tokens < 1:
            raise ValueError(f"max_gather_tokens must be >= 1, got {max_gather_tokens}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.max_gather_tokens = max_gather_tokens
        self.dtype = dtype
        self._workspace: torch.Tensor | None = None                                      # [2, N, Hkv, D]
        self.decode_kernel = None
        if use_native_kernel is not False and dtype == torch.float32:
            from backends.cpu.native import decode_attention

            kernel = decode_attention()
            if kernel is not None and kernel.supports(num_heads, num_kv_heads, head_dim, block_size=1):
                self.decode_kernel = kernel

    def build_metadata(self, query_lens: Sequence[int], num_computed_tokens: Sequence[int],
                       block_tables: Sequence[Sequence[int]], slot_mapping: Sequence[int],
                       block_size: int) -> CPUAttentionMetadata:
        """``build_attention_metadata`` with this instance's gather budget."""
        native = self.decode_kernel is not None and self.decode_kernel.supports(
            self.num_heads, self.num_kv_heads, self.head_dim, block_size)
        return build_attention_metadata(query_lens, num_computed_tokens, block_tables, slot_mapping,
                                        block_size, self.max_gather_tokens, self.dtype, native_decode=native,
                                        max_mask_elements=MAX_MASK_ELEMENTS)

    def metadata_from_inputs(self, step: StepInputs, block_size: int) -> CPUAttentionMetadata:
        """``metadata_from_inputs`` of a persistent batch's step with this instance's gather budget."""
        native = self.decode_kernel is not None and self.decode_kernel.supports(
            self.num_heads, self.num_kv_heads, self.head_dim, block_size)
        return metadata_from_inputs(step, block_size, self.max_gather_tokens, self.dtype, native_decode=native,
                                    max_mask_elements=MAX_MASK_ELEMENTS)

    def native_decode_inputs(self, metadata: CPUAttentionMetadata
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(slots [T] int64, block_tables [T, W] int32, context_lens [T] int32)`` of a decode-only step
        the native kernel serves (one row per request, in order): what a one-call native layer
        (``backends.cpu.native.layer``) needs to do this attention's work itself; None otherwise."""
        native = metadata.native_decode
        if native is None or not native.every or native.rows.shape[0] != metadata.slot_mapping.shape[0]:
            return None
        return metadata.slot_mapping, native.block_tables, native.context_lens

    def token_context_lens(self, metadata: CPUAttentionMetadata) -> torch.Tensor:
        """``[T]`` int64: each new token's request context length after this step."""
        return metadata.token_context_lens()

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], metadata: CPUAttentionMetadata,
                layer: LayerAttention | None = None) -> torch.Tensor:
        """Write K/V of the step, then attend; returns ``[T, H, D]``."""
        k_cache, v_cache = kv_cache
        h_kv, d = self.num_kv_heads, self.head_dim
        layer = layer or LayerAttention(self.scale)
        native = metadata.native_decode
        if native is not None and native.every and q.shape[0] == native.rows.shape[0] \
                and rows_of_heads(q, q.shape[0], self.num_heads, d) and rows_of_heads(k, k.shape[0], h_kv, d) \
                and rows_of_heads(v, v.shape[0], h_kv, d):
            # a decode-only step: the kernel writes the new K/V, reads q's rows in place (a view of the
            # QKV buffer) and writes every output row, no selection copies
            return self.decode_kernel(q, k_cache, v_cache, native.block_tables, native.context_lens,
                                      layer.scale, window=layer.window, softcap=layer.softcap,
                                      new_kv=(k, v, metadata.slot_mapping))    # [T, H, D]
        k_cache.view(-1, h_kv, d).index_copy_(0, metadata.slot_mapping, k)      # [S, Hkv, D]
        v_cache.view(-1, h_kv, d).index_copy_(0, metadata.slot_mapping, v)      # [S, Hkv, D]
        metadata = metadata.windowed(layer.window)
        native = metadata.native_decode
        out = q.new_empty(q.shape)                                              # [T, H, D]
        if native is not None:
            decoded = self.decode_kernel(q.index_select(0, native.rows), k_cache, v_cache, native.block_tables,
                                         native.context_lens, layer.scale, window=layer.window,
                                         softcap=layer.softcap)                  # [n, H, D]
            out.index_copy_(0, native.rows, decoded)
        for group in metadata.decode_groups:
            decoded = self._decode(q.index_select(0, group.rows), k_cache, v_cache, group, layer)  # [n, H, D]
            out.index_copy_(0, group.rows, decoded)
        for chunk in metadata.prefills:
            s, e = chunk.query_start, chunk.query_end
            out[s:e] = self._prefill(q[s:e], k[s:e], v[s:e], k_cache, v_cache, chunk, layer)  # [q, H, D]
        return out

    def _gather(self, k_cache: torch.Tensor, v_cache: torch.Tensor,
                block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``block_ids`` copied into the workspace: ``[n_blocks * block_size, Hkv, D]`` each."""
        num_tokens = block_ids.shape[0] * k_cache.shape[1]
        if self._workspace is None or self._workspace.shape[1] < num_tokens or self._workspace.dtype != k_cache.dtype:
            self._workspace = k_cache.new_empty((2, num_tokens, self.num_kv_heads, self.head_dim))  # [2, N, Hkv, D]
        shape = (block_ids.shape[0], *k_cache.shape[1:])
        keys = self._workspace[0, :num_tokens].view(shape)                               # [nb, bs, Hkv, D]
        values = self._workspace[1, :num_tokens].view(shape)                             # [nb, bs, Hkv, D]
        torch.index_select(k_cache, 0, block_ids, out=keys)
        torch.index_select(v_cache, 0, block_ids, out=values)
        flat = (num_tokens, self.num_kv_heads, self.head_dim)
        return keys.view(flat), values.view(flat)                                        # [N, Hkv, D] each

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                group: DecodeGroup, layer: LayerAttention) -> torch.Tensor:
        batch = q.shape[0]
        h_kv, d = self.num_kv_heads, self.head_dim
        keys, values = self._gather(k_cache, v_cache, group.block_ids)                   # [n * L, Hkv, D] each
        keys = keys.view(batch, -1, h_kv, d).transpose(1, 2)                             # [n, Hkv, L, D]
        values = values.view(batch, -1, h_kv, d).transpose(1, 2)                         # [n, Hkv, L, D]
        queries = q.view(batch, h_kv, self.num_heads // h_kv, d)                         # [n, Hkv, G, D]
        out = attend(queries, keys, values, layer.scale, group.mask, softcap=layer.softcap)  # [n, Hkv, G, D]
        return out.reshape(batch, self.num_heads, d)                                     # [n, H, D]

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, chunk: PrefillChunk, layer: LayerAttention) -> torch.Tensor:
        queries = q.transpose(0, 1).unsqueeze(0)                                         # [1, H, q, D]
        if chunk.block_ids is None:
            keys = k.transpose(0, 1).unsqueeze(0)                                        # [1, Hkv, q, D]
            values = v.transpose(0, 1).unsqueeze(0)                                      # [1, Hkv, q, D]
            out = attend(queries, keys, values, layer.scale, is_causal=True, softcap=layer.softcap)  # [1, H, q, D]
        else:
            keys, values = self._gather(k_cache, v_cache, chunk.block_ids)               # [nb * bs, Hkv, D] each
            n = chunk.context_len - chunk.key_start
            out = attend(queries, keys[:n].transpose(0, 1).unsqueeze(0), values[:n].transpose(0, 1).unsqueeze(0),
                         layer.scale, chunk.mask, softcap=layer.softcap)                 # [1, H, q, D]
        return out[0].transpose(0, 1)                                                    # [q, H, D]


def write_kv_cache_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       slot_mapping: Sequence[int] | torch.Tensor) -> None:
    """Reference cache write: token ``i``'s ``k[i]``/``v[i]`` ``[Hkv, D]`` go to slot ``slot_mapping[i]``."""
    block_size = k_cache.shape[1]
    for i, slot in enumerate(torch.as_tensor(slot_mapping).tolist()):
        k_cache[slot // block_size, slot % block_size] = k[i]                             # [Hkv, D]
        v_cache[slot // block_size, slot % block_size] = v[i]                             # [Hkv, D]


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: Sequence[Sequence[int]] | torch.Tensor,
    context_lens: Sequence[int] | torch.Tensor,
    query_start_locs: Sequence[int] | torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Reference paged attention with plain loops, computed in float32.

    ``q`` is ``[T, H, D]``; request ``r`` owns rows ``query_start_locs[r] ..
    query_start_locs[r+1]-1``, which are the LAST positions of its
    ``context_lens[r]`` tokens; a query at position ``p`` sees cached keys
    ``0..p`` (read through ``block_tables[r]``), or only ``p - window + 1 ..
    p`` with a sliding ``window``; scores are ``softcap * tanh(s / softcap)``
    with a ``softcap``. Returns ``[T, H, D]`` in ``q.dtype``.
    """
    block_size, h_kv = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // h_kv
    tables = block_tables.tolist() if isinstance(block_tables, torch.Tensor) else [list(t) for t in block_tables]
    lens = torch.as_tensor(context_lens).tolist()
    starts = torch.as_tensor(query_start_locs).tolist()
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)                     # [T, H, D]
    for r, context_len in enumerate(lens):
        q_len = starts[r + 1] - starts[r]
        for i in range(q_len):
            pos = context_len - q_len + i
            row = starts[r] + i
            seen = range(0 if window is None else max(0, pos - window + 1), pos + 1)
            keys = torch.stack([k_cache[tables[r][p // block_size], p % block_size] for p in seen])    # [n, Hkv, D]
            values = torch.stack([v_cache[tables[r][p // block_size], p % block_size] for p in seen])  # [n, Hkv, D]
            for h in range(q.shape[1]):
                scores = keys[:, h // group].float() @ q[row, h].float() * scale         # [n]
                if softcap is not None:
                    scores = torch.tanh(scores / softcap) * softcap
                out[row, h] = torch.softmax(scores, dim=0) @ values[:, h // group].float()  # [D]
    return out.to(q.dtype)
