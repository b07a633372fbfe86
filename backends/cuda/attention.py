"""``AttentionBackend`` of the cuda backend: the Triton cache write and paged attention.

Per step, ``build_metadata`` turns the scheduler's lists into one int32
host array, copies it to the device once and slices it into the tensors
below; every layer then runs two kernels: ``reshape_and_cache`` (all new
K/V of the step written before anyone attends: a request may read blocks
another request of the step has just written) and ``paged_attention``
(prefill, chunked prefill and decode rows of the step in one launch).

Each KV split count is a separately compiled kernel variant (and so is the
prefill tile shape). ``warmup_metadata`` lists one step per variant a
backend can launch, so that they are all compiled at start-up rather than
on the first request whose context needs one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from backends.cuda.kernels.paged_attention import AttentionPlan, choose_num_splits, paged_attention, plan_attention
from backends.cuda.kernels.reshape_and_cache import reshape_and_cache
from model.config import LayerAttention

DEFAULT_BLOCK_N = 64            # keys per tile on a GPU


@dataclass
class TritonAttentionMetadata:
    """Per-step inputs of ``TritonAttention``, shared by all layers (device tensors)."""

    slot_mapping: torch.Tensor         # [T] int32: cache slot of each new token (-1: padding, skipped)
    block_tables: torch.Tensor         # [R, max_blocks] int32 (padded with 0)
    context_lens: torch.Tensor         # [R] int32: cached + new tokens
    query_start_locs: torch.Tensor     # [R + 1] int32: first row of each request in the batch
    plan: AttentionPlan                # the kernel's program table


def pack_step_arrays(query_lens: Sequence[int], num_computed_tokens: Sequence[int],
                     block_tables: Sequence[Sequence[int]], slot_mapping: Sequence[int]) -> dict[str, np.ndarray]:
    """The step's int32 host arrays.

    ``context_lens``, ``query_start_locs``, ``block_tables`` (padded with 0) and ``slot_mapping``.
    """
    if not len(query_lens) == len(num_computed_tokens) == len(block_tables):
        raise ValueError("query_lens, num_computed_tokens and block_tables must have one entry per request")
    query_lens = np.asarray(query_lens, dtype=np.int32)
    if query_lens.size == 0 or query_lens.min() < 1:
        raise ValueError("every scheduled request needs at least one new token")
    if len(slot_mapping) != int(query_lens.sum()):
        raise ValueError(f"slot_mapping has {len(slot_mapping)} entries for {int(query_lens.sum())} tokens")
    width = max(1, max(len(t) for t in block_tables))
    tables = np.zeros((len(block_tables), width), dtype=np.int32)              # [R, W]
    for i, table in enumerate(block_tables):
        tables[i, : len(table)] = table
    return {
        "context_lens": np.asarray(num_computed_tokens, dtype=np.int32) + query_lens,
        "query_start_locs": np.concatenate(([0], np.cumsum(query_lens))).astype(np.int32),
        "block_tables": tables,
        "slot_mapping": np.asarray(slot_mapping, dtype=np.int32),
    }


class TritonAttention:
    """``AttentionBackend`` running the Triton kernels (on CPU tensors under ``TRITON_INTERPRET=1``)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 num_sms: int = 1, block_n: int = DEFAULT_BLOCK_N, max_splits: int = 16) -> None:
        if num_heads % num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_group = num_heads // num_kv_heads
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.num_sms = num_sms
        self.block_n = block_n
        self.max_splits = max_splits

    def split_counts(self, max_context_len: int) -> list[int]:
        """Every KV split count a decode step can use, for contexts up to ``max_context_len``.

        ``choose_num_splits`` is largest for a single request at the longest
        context; every count below it occurs too (shorter contexts have fewer
        key tiles, larger batches want fewer splits).
        """
        most = choose_num_splits(1, self.num_kv_heads, max_context_len, self.block_n, self.num_sms, self.max_splits)
        return list(range(1, most + 1))

    def warmup_metadata(self, max_context_len: int, block_size: int,
                        device: torch.device | str) -> list[TritonAttentionMetadata]:
        """One step's metadata per attention variant: a decode per split count, then a two-token prefill.

        Each is a single request over block 0 whose context makes
        ``build_metadata`` itself choose that split count; every slot is -1,
        so running them writes nothing to the cache.
        """
        steps = []
        for splits in self.split_counts(max_context_len):
            context = min(max_context_len, splits * self.block_n)
            steps.append(self.build_metadata([1], [context - 1], [[0] * -(-context // block_size)], [-1], device))
        steps.append(self.build_metadata([2], [0], [[0]], [-1, -1], device))
        return steps

    def build_metadata(self, query_lens: Sequence[int], num_computed_tokens: Sequence[int],
                       block_tables: Sequence[Sequence[int]], slot_mapping: Sequence[int],
                       device: torch.device | str) -> TritonAttentionMetadata:
        """Metadata of one step from the scheduler's per-request lists (one host-to-device copy)."""
        arrays = pack_step_arrays(query_lens, num_computed_tokens, block_tables, slot_mapping)
        flat = np.concatenate([a.reshape(-1) for a in arrays.values()])
        on_device = torch.from_numpy(flat).to(device, non_blocking=True)
        views, offset = {}, 0
        for name, a in arrays.items():
            views[name] = on_device[offset: offset + a.size].view(a.shape)
            offset += a.size
        num_splits = 1
        if max(query_lens) == 1:
            num_splits = choose_num_splits(len(query_lens), self.num_kv_heads, int(arrays["context_lens"].max()),
                                           self.block_n, self.num_sms, self.max_splits)
        plan = plan_attention(query_lens, self.num_group, device, num_splits=num_splits, block_n=self.block_n)
        return TritonAttentionMetadata(plan=plan, **views)

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], metadata: TritonAttentionMetadata,
                out: torch.Tensor | None = None, layer: LayerAttention | None = None) -> torch.Tensor:
        """Write K/V of the step, then attend; returns ``[T, H, D]`` (``out`` when given).

        ``layer``: the layer's scale, sliding window and soft-cap (None: this instance's scale, full, no cap).
        """
        k_cache, v_cache = kv_cache
        reshape_and_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
        layer = layer or LayerAttention(self.scale)
        return paged_attention(q, k_cache, v_cache, metadata.block_tables, metadata.context_lens,
                               metadata.query_start_locs, layer.scale, metadata.plan, out=out,
                               window=layer.window, softcap=layer.softcap)
