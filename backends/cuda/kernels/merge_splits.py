"""Merge the split-KV partial results of ``paged_attention``.

Split ``s`` of a query row wrote its output normalised over its own keys,
``o_s``, and its base-2 log-sum-exp ``lse_s`` (``-inf`` when it saw no key).
The full result is ``sum_s w_s o_s`` with ``w_s = 2^(lse_s - max) / sum 2^(lse - max)``.
One program per (token, query head); only rows covered by the plan's query
blocks are written (padding rows keep their value).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.cuda.kernels.launch import KernelLaunch


@triton.jit(do_not_specialize=["stride_ps", "stride_ls"])
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, qblock_request_ptr, qblock_start_ptr, query_start_locs_ptr,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    qblock = tl.program_id(0)
    head = tl.program_id(1)
    request = tl.load(qblock_request_ptr + qblock)
    q_first = tl.load(qblock_start_ptr + qblock)
    q_end = tl.load(query_start_locs_ptr + request + 1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_valid = s < NUM_SPLITS
    d_valid = d < HEAD_DIM
    for i in range(0, BLOCK_Q):
        token = (q_first + i).to(tl.int64)
        if token < q_end:
            lse = tl.load(part_lse_ptr + s * stride_ls + token * stride_lt + head, mask=s_valid,
                          other=float("-inf"))                                   # [S]
            m = tl.max(lse, 0)
            m = tl.where(m == float("-inf"), 0.0, m)
            w = tl.exp2(lse - m)                                                # [S]
            total = tl.sum(w, 0)
            w = w / tl.where(total > 0, total, 1.0)
            parts = tl.load(part_out_ptr + s[:, None] * stride_ps + token * stride_pt + head * stride_ph
                            + d[None, :], mask=s_valid[:, None] & d_valid[None, :], other=0.0)  # [S, BD]
            merged = tl.sum(parts * w[:, None], 0)                              # [BD]
            tl.store(out_ptr + token * stride_ot + head * stride_oh + d, merged.to(out_ptr.dtype.element_ty),
                     mask=d_valid)


def merge_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor,
                 query_start_locs: torch.Tensor, plan) -> torch.Tensor:
    """Combine ``part_out`` ``[S, T, H, D]`` (float32) by ``part_lse`` ``[S, T, H]`` into ``out`` ``[T, H, D]``.

    Rows are those of ``plan``'s query blocks (``paged_attention.AttentionPlan``).
    """
    if plan.num_qblocks == 0:
        return out
    merge_splits_launch(part_out, part_lse, out, query_start_locs, plan).run()
    return out


def merge_splits_launch(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor,
                        query_start_locs: torch.Tensor, plan) -> KernelLaunch:
    """The merge kernel's launch: one program per (query block, query head)."""
    num_splits, _, num_heads, head_dim = part_out.shape
    return KernelLaunch(
        _merge_splits_kernel, (plan.num_qblocks, num_heads),
        (part_out, part_lse, out, plan.qblock_request_ids, plan.qblock_starts, query_start_locs,
         part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
         out.stride(0), out.stride(1)),
        dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_Q=plan.block_q,
             NUM_SPLITS=num_splits, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), num_warps=4),
    )


def merge_splits_ref(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor,
                     query_start_locs: torch.Tensor, plan=None) -> torch.Tensor:
    """Reference over all rows up to ``query_start_locs[-1]`` (``plan`` ignored)."""
    num_tokens = int(query_start_locs[-1])
    lse = part_lse[:, :num_tokens].float()                                       # [S, T, H]
    m = lse.amax(0).nan_to_num(neginf=0.0)                                       # [T, H]
    w = torch.exp2(lse - m)                                                      # [S, T, H]
    w = w / w.sum(0).clamp_min(1e-30)                                            # [S, T, H]
    out[:num_tokens] = (part_out[:, :num_tokens] * w[..., None]).sum(0).to(out.dtype)  # [T, H, D]
    return out
