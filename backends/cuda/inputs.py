"""The cuda backend's step inputs: the persistent batch's arrays, staged in pinned memory, one async copy.

``backends.input_batch.InputBatch`` keeps the block tables across steps and
fills the step arrays with numpy; this module moves them to the GPU. Every
int32 array of a step (token ids, positions, logits rows, slots, context
lengths, query starts, the step's block-table rows and the attention plan's
program table) is packed into one pinned host buffer and copied with a
single ``non_blocking`` copy; the device tensors are views of that copy::

    pinned host [capacity] int32  --copy_(non_blocking)-->  device [capacity] int32
    | ids T | positions T | rows N | slots T | ctx R | starts R+1 | tables R*W | plan P, P |

Before the host buffer is overwritten the next step waits on the event
recorded after the last copy (in practice it has long finished: the sampler
syncs every step). Without a GPU (tests under ``TRITON_INTERPRET=1``) the
buffer is plain memory and the "device" tensors are a copy of it.
"""

from __future__ import annotations

import numpy as np
import torch

from backends.cuda.attention import TritonAttention, TritonAttentionMetadata
from backends.cuda.kernels.paged_attention import AttentionPlan, block_shape, choose_num_splits, plan_query_blocks
from backends.input_batch import StepInputs


class PinnedStaging:
    """A pinned int32 host buffer and its device twin; ``upload`` sends a list of arrays in one copy."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.device = device
        self.on_gpu = device.type == "cuda"
        self._allocate(max(1, capacity))

    def _allocate(self, capacity: int) -> None:
        self.host = torch.empty(capacity, dtype=torch.int32, pin_memory=self.on_gpu)       # [C]
        self.host_np = self.host.numpy()
        self.dev = torch.empty(capacity, dtype=torch.int32, device=self.device) if self.on_gpu else None
        self._copied = None                                   # event after the last copy (GPU only)

    def upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Device int32 tensors equal to ``arrays`` (same shapes), through one host-to-device copy."""
        total = sum(a.size for a in arrays)
        if self._copied is not None:
            self._copied.synchronize()                        # the last copy has read the host buffer
        if total > self.host.shape[0]:
            self._allocate(2 * total)
        offset = 0
        for a in arrays:
            np.copyto(self.host_np[offset: offset + a.size], a.reshape(-1), casting="unsafe")
            offset += a.size
        if self.on_gpu:
            flat = self.dev[:total]
            flat.copy_(self.host[:total], non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            flat = self.host[:total].clone()                  # the host buffer is reused next step
        views, offset = [], 0
        for a in arrays:
            views.append(flat[offset: offset + a.size].view(a.shape))
            offset += a.size
        return views


def upload_step(staging: PinnedStaging, step: StepInputs, attention: TritonAttention,
                prefill_block_m: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TritonAttentionMetadata]:
    """``(input_ids, positions, logits_indices, metadata)`` of an eager or piecewise step, on the device.

    The plan is ``plan_attention``'s (``block_shape`` of the longest chunk,
    ``plan_query_blocks``), with the KV split count of a decode-only step
    chosen as ``TritonAttention.build_metadata`` does.
    """
    num_reqs = step.num_reqs
    max_query_len = int(step.query_lens.max())
    block_m, block_q = block_shape(attention.num_group, max_query_len, prefill_block_m)
    qblock_requests, qblock_starts = plan_query_blocks(step.query_lens, block_q)
    num_splits = 1
    if max_query_len == 1:
        num_splits = choose_num_splits(num_reqs, attention.num_kv_heads, int(step.context_lens.max()),
                                       attention.block_n, attention.num_sms, attention.max_splits)
    ids, positions, rows, slots, ctx, starts, tables, plan_requests, plan_starts = staging.upload([
        step.token_ids, step.positions, step.logits_indices, step.slot_mapping, step.context_lens,
        step.query_start_locs, step.tables(width=max(1, int(step.num_blocks.max()))), qblock_requests, qblock_starts])
    plan = AttentionPlan(plan_requests, plan_starts, block_m, block_q, attention.block_n, num_splits)
    return ids, positions, rows, TritonAttentionMetadata(slots, tables, ctx, starts, plan)


def upload_full_step(staging: PinnedStaging, step: StepInputs, batch: int) -> list[torch.Tensor]:
    """``[ids, positions, slots, context_lens]`` padded to ``batch`` (slots with -1: skipped) and the
    ``[R, W]`` block tables of a decode-only step, on the device (one copy)."""
    def padded(a: np.ndarray, fill: int) -> np.ndarray:
        out = np.full(batch, fill, dtype=np.int32)
        out[: len(a)] = a
        return out

    return staging.upload([padded(step.token_ids, 0), padded(step.positions, 0), padded(step.slot_mapping, -1),
                           padded(step.context_lens, 0), step.tables(width=max(1, int(step.num_blocks.max())))])
