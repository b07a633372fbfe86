"""Paged attention of a flattened variable-length batch: one kernel for all steps.

The batch is the step's new tokens laid end to end (``q`` ``[T, H, D]``);
request ``r`` owns rows ``query_start_locs[r] .. query_start_locs[r+1]-1``,
the last positions of its ``context_lens[r]`` tokens, whose K/V are already
in the paged cache (``reshape_and_cache`` runs first). A query at position
``p`` attends to keys ``0..p``: the cached prefix plus the causal part of its
own chunk. Prefill (nothing cached), chunked prefill (a cached prefix) and
decode (one query) are the same computation with different ``q_len``.

Work split (a program = one query block x one KV head x one KV split)::

    rows of a program (BLOCK_M = BLOCK_Q tokens x G query heads of one KV head)
        row r -> token  q_first + r // G,  head  kv_head * G + r % G
    keys: tiles of BLOCK_N positions, each position read through the block
          table (block_tables[r][n // block_size], n % block_size)

All G query heads sharing a KV head are processed together, so each K/V tile
is read once per group (GQA). Softmax is online (running max and sum in
float32, base 2). With ``num_splits > 1`` the keys of a request are cut into
that many contiguous ranges processed in parallel (flash-decoding: few
requests with long contexts still fill the GPU); each split writes its
normalised partial output and log-sum-exp, and ``merge_splits`` combines them.

Which query blocks exist is planned on the host from the query lengths
(``plan_attention``); the plan's arrays are the kernel's program table.

Sliding window (``window`` > 0, a runtime argument: no variant per size): a
query at ``p`` sees keys ``p - window + 1 .. p`` only; a program starts its
key tiles at its first row's window, so windowed layers read ``window +
BLOCK_Q`` keys per query block however long the context, and the KV splits
cut that range. Soft-cap (``SOFTCAP``): scores become ``cap * tanh(s / cap)``
before the online softmax (Gemma 2).

Tiles and warps (``attention_tile``) are chosen so that no variant spills
registers on sm_90 (``scripts/kernel_report.py`` and
``tests/backends/cuda/test_aot_compile.py`` compile them ahead of time):
16-bit inputs use the plan's ``block_n`` keys per tile with 4 warps, 8 for
64-row tiles of head_dim 256 (at 4 they spilled 352 B per thread). Float32
runs IEEE dots, whose operands live in registers: its 64-row (prefill)
tiles take at most ``FP32_MAX_BLOCK_N`` keys (16 at head_dim 256) and 8
warps: at 64 keys and 4 warps one spilled ~30 KB per thread (ptxas for
sm_90a, triton 3.6 and 3.9), at 32 keys and 4 warps ~600 B. Its 16-row
decode tiles keep 64 keys and 4 warps (at 32 keys the split variants
spilled), 8 warps at head_dim 256 (2 KB spilled at 4).
Runtime integers that change from step to step (the block-table width, the
partial buffers' token strides) are not specialised on, so a new batch shape
never compiles a new variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from backends.cuda.kernels.launch import KernelLaunch
from backends.cuda.kernels.merge_splits import merge_splits

LOG2E = 1.4426950408889634
FP32_MAX_BLOCK_N = 32           # keys per tile at most of 64-row tiles whose dots run in IEEE float32 (D <= 128)


@dataclass
class AttentionPlan:
    """How one step's attention is cut into programs (host-built, device arrays)."""

    qblock_request_ids: torch.Tensor   # [P] int32: request of each query block
    qblock_starts: torch.Tensor        # [P] int32: first row (flattened batch) of each query block
    block_m: int                       # rows per program (query tokens x G heads), power of two >= 16
    block_q: int                       # query tokens per program: block_m // G
    block_n: int                       # keys per tile (64-row float32 tiles use at most FP32_MAX_BLOCK_N)
    num_splits: int                    # KV splits per query block (1: no merge)

    @property
    def num_qblocks(self) -> int:
        return self.qblock_request_ids.shape[0]


def block_shape(num_group: int, max_query_len: int, prefill_block_m: int = 64) -> tuple[int, int]:
    """``(block_m, block_q)`` for a step whose longest chunk is ``max_query_len`` tokens.

    Decode-only steps use the fewest rows that hold one token's G heads
    (at least 16, what ``tl.dot`` needs); steps with longer chunks use
    ``prefill_block_m`` rows (raised to hold at least one token).
    """
    if num_group < 1 or max_query_len < 1:
        raise ValueError("num_group and max_query_len must be >= 1")
    base = max(16, triton.next_power_of_2(num_group))
    block_m = base if max_query_len == 1 else max(base, prefill_block_m)
    return block_m, block_m // num_group


def plan_query_blocks(query_lens: np.ndarray, block_q: int) -> tuple[np.ndarray, np.ndarray]:
    """Request id and first row of every query block: ``ceil(q_len / block_q)`` blocks per request."""
    query_lens = np.asarray(query_lens, dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(query_lens)[:-1]))                  # [R]
    counts = -(-query_lens // block_q)                                          # [R]
    request_ids = np.repeat(np.arange(len(query_lens)), counts)                  # [P]
    first_block = np.concatenate(([0], np.cumsum(counts)[:-1]))                 # [R]
    within = np.arange(int(counts.sum())) - np.repeat(first_block, counts)       # [P]
    return request_ids.astype(np.int32), (np.repeat(starts, counts) + within * block_q).astype(np.int32)


def choose_num_splits(num_qblocks: int, num_kv_heads: int, max_context_len: int, block_n: int,
                      num_sms: int, max_splits: int = 16) -> int:
    """KV splits so that ``num_qblocks * num_kv_heads * splits`` fills about 2 waves of ``num_sms``.

    Never more splits than key tiles of the longest context, so no split is
    empty for it; 1 when the batch alone fills the GPU.
    """
    programs = max(1, num_qblocks * num_kv_heads)
    wanted = -(-2 * num_sms // programs)
    tiles = max(1, -(-max_context_len // block_n))
    return max(1, min(max_splits, wanted, tiles))


def plan_attention(query_lens, num_group: int, device: torch.device | str, num_splits: int = 1,
                   block_n: int = 64, prefill_block_m: int = 64) -> AttentionPlan:
    """The plan of a step with these per-request query lengths."""
    query_lens = np.asarray(query_lens, dtype=np.int64)
    block_m, block_q = block_shape(num_group, int(query_lens.max()), prefill_block_m)
    request_ids, starts = plan_query_blocks(query_lens, block_q)
    return AttentionPlan(
        qblock_request_ids=torch.from_numpy(request_ids).to(device),
        qblock_starts=torch.from_numpy(starts).to(device),
        block_m=block_m, block_q=block_q, block_n=block_n, num_splits=num_splits,
    )


@triton.jit(do_not_specialize=["stride_bt", "stride_ps", "stride_ls", "window"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    block_tables_ptr, context_lens_ptr, query_start_locs_ptr, qblock_request_ptr, qblock_start_ptr,
    qk_scale,                                     # softmax scale * log2(e)
    window,                                       # sliding window (0: full attention)
    softcap_log2,                                 # soft-cap * log2(e) (read with SOFTCAP)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
    NUM_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_FP32: tl.constexpr, SOFTCAP: tl.constexpr,
):
    qblock = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    request = tl.load(qblock_request_ptr + qblock)
    q_first = tl.load(qblock_start_ptr + qblock)
    q_start = tl.load(query_start_locs_ptr + request)
    q_end = tl.load(query_start_locs_ptr + request + 1)
    context_len = tl.load(context_lens_ptr + request)
    num_cached = context_len - (q_end - q_start)                                # positions before the chunk

    rows = tl.arange(0, BLOCK_M)
    token = q_first + rows // NUM_GROUP                                         # [M]
    head = kv_head * NUM_GROUP + rows % NUM_GROUP                               # [M]
    row_valid = (rows // NUM_GROUP < BLOCK_Q) & (token < q_end)                 # [M]
    pos = num_cached + token - q_start                                          # [M] query positions
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    q = tl.load(q_ptr + token[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)          # [M, BD]
    if DOT_FP32:
        q = q.to(tl.float32)

    # keys this block sees: from its first token's window (0 without one) up to the position of its
    # last token; this split's share of them
    kv_end = tl.minimum(context_len, num_cached + q_first - q_start + BLOCK_Q)
    kv_lo = tl.where(window > 0, tl.maximum(num_cached + q_first - q_start - window + 1, 0), 0)
    split_len = tl.cdiv(tl.cdiv(kv_end - kv_lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = kv_lo + split * split_len
    hi = tl.minimum(kv_end, lo + split_len)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + request.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)                                       # [N] key positions
        n_valid = n < hi
        block = tl.load(table + n // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
        k_off = block * stride_kb + (n % BLOCK_SIZE) * stride_ks + kv_head * stride_kh   # [N]
        v_off = block * stride_vb + (n % BLOCK_SIZE) * stride_vs + kv_head * stride_vh   # [N]
        kt = tl.load(k_cache_ptr + k_off[None, :] + d[:, None],
                     mask=n_valid[None, :] & d_valid[:, None], other=0.0)       # [BD, N]
        if DOT_FP32:
            kt = kt.to(tl.float32)
        if DOT_FP32:
            s = tl.dot(q, kt, input_precision="ieee") * qk_scale                # [M, N] (log2 units)
        else:
            s = tl.dot(q, kt) * qk_scale                                        # [M, N] (log2 units)
        if SOFTCAP:                                                             # cap * tanh(s / cap), stably
            x = s / softcap_log2
            e = tl.exp(-2.0 * tl.abs(x))
            t = (1.0 - e) / (1.0 + e)
            s = tl.where(x < 0, -t, t) * softcap_log2
        allowed = row_valid[:, None] & n_valid[None, :] & (n[None, :] <= pos[:, None])
        allowed = allowed & ((window == 0) | (n[None, :] > pos[:, None] - window))
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))                                   # [M]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)                                           # [M]
        p = tl.exp2(s - m_safe[:, None])                                        # [M, N]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + v_off[:, None] + d[None, :],
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)        # [N, BD]
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]                           # [M, BD]
    store_mask = row_valid[:, None] & d_valid[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + token[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        part = part_out_ptr + split * stride_ps + token.to(tl.int64) * stride_pt + head * stride_ph   # [M]
        tl.store(part[:, None] + d[None, :], out, mask=store_mask)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + split * stride_ls + token.to(tl.int64) * stride_lt + head, lse, mask=row_valid)


def attention_tile(block_m: int, block_d: int, block_n: int, dot_fp32: bool) -> tuple[int, int]:
    """``(keys per tile, warps)`` of a program of ``block_m`` rows (see the module docstring)."""
    wide = block_d > 128                                                        # head_dim 256 (Gemma)
    if not dot_fp32:
        return block_n, 8 if block_m > 64 or (wide and block_m >= 64) else 4
    if block_m >= 64:                                                           # prefill tiles
        return min(block_n, 16 if wide else FP32_MAX_BLOCK_N), 8
    return block_n, 8 if wide else 4


def attention_meta(num_group: int, head_dim: int, block_size: int, plan: AttentionPlan,
                   dot_fp32: bool, softcap: bool = False) -> dict:
    """Constexprs and warps of the kernel variant that runs ``plan`` (see the module docstring)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n, num_warps = attention_tile(plan.block_m, block_d, plan.block_n, dot_fp32)
    return dict(
        SOFTCAP=softcap,
        NUM_GROUP=num_group, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_M=plan.block_m, BLOCK_Q=plan.block_q, BLOCK_N=block_n,
        NUM_SPLITS=plan.num_splits, DOT_FP32=dot_fp32, num_warps=num_warps,
    )


def paged_attention_launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, query_start_locs: torch.Tensor,
                           scale: float, plan: AttentionPlan, out: torch.Tensor, part_out: torch.Tensor,
                           part_lse: torch.Tensor, window: int | None = None,
                           softcap: float | None = None) -> KernelLaunch:
    """The attention kernel's launch for ``plan`` (``part_*``: the split buffers, or ``out`` when unsplit).

    ``window``: sliding window of the layer (None: full); ``softcap``: its score soft-cap (None: none).
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    # the interpreter mishandles bfloat16 dots; native kernels keep 16-bit operands
    dot_fp32 = q.dtype == torch.float32 or (q.device.type == "cpu" and q.dtype == torch.bfloat16)
    return KernelLaunch(
        _paged_attention_kernel, (plan.num_qblocks, num_kv_heads, plan.num_splits),
        (q, k_cache, v_cache, out, part_out, part_lse,
         block_tables, context_lens, query_start_locs, plan.qblock_request_ids, plan.qblock_starts,
         scale * LOG2E, window or 0, (softcap or 1.0) * LOG2E,
         q.stride(0), q.stride(1), out.stride(0), out.stride(1),
         k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
         v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
         block_tables.stride(0),
         part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1)),
        attention_meta(num_heads // num_kv_heads, head_dim, k_cache.shape[1], plan, dot_fp32, softcap is not None),
    )


def split_buffers(num_splits: int, num_tokens: int, num_heads: int, head_dim: int,
                  device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 partial outputs ``[S, T, H, D]`` and log-sum-exps ``[S, T, H]`` of a split launch."""
    return (torch.empty((num_splits, num_tokens, num_heads, head_dim), dtype=torch.float32, device=device),
            torch.empty((num_splits, num_tokens, num_heads), dtype=torch.float32, device=device))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_start_locs: torch.Tensor, scale: float,
                    plan: AttentionPlan, out: torch.Tensor | None = None, window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Attention of ``q`` ``[T, H, D]`` over the paged cache; returns ``out`` ``[T, H, D]``.

    ``block_tables`` ``[R, max_blocks]`` int32, ``context_lens`` ``[R]`` int32
    (cached + new tokens), ``query_start_locs`` ``[R + 1]`` int32. Rows not
    covered by ``plan`` (padding) are left untouched. ``window`` and
    ``softcap`` as in ``model.config.LayerAttention``.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError("num_heads must be a multiple of the cache's num_kv_heads")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or block_tables.stride(1) != 1:
        raise ValueError("q, the caches and block_tables must have a contiguous last dim")
    num_group = num_heads // num_kv_heads
    if plan.block_q != plan.block_m // num_group:
        raise ValueError(f"plan.block_q={plan.block_q} does not match block_m={plan.block_m} and G={num_group}")
    if out is None:
        out = torch.empty_like(q)
    if plan.num_qblocks == 0:
        return out
    if plan.num_splits > 1:
        part_out, part_lse = split_buffers(plan.num_splits, num_tokens, num_heads, head_dim, q.device)
    else:
        part_out = part_lse = out                                               # unused
    paged_attention_launch(q, k_cache, v_cache, block_tables, context_lens, query_start_locs, scale, plan,
                           out, part_out, part_lse, window, softcap).run()
    if plan.num_splits > 1:
        merge_splits(part_out, part_lse, out, query_start_locs, plan)
    return out


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, query_start_locs: torch.Tensor, scale: float,
                        plan: AttentionPlan | None = None, out: torch.Tensor | None = None,
                        window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Reference: the cpu backend's loop reference (float32 math); ``plan`` is ignored."""
    from backends.cpu.attention import paged_attention_ref as cpu_ref

    tables = block_tables.cpu().tolist()
    result = cpu_ref(q.cpu(), k_cache.cpu(), v_cache.cpu(), tables, context_lens.cpu(),
                     query_start_locs.cpu(), scale, window, softcap).to(q.device)  # [T, H, D]
    if out is None:
        return result
    out.copy_(result)
    return out
