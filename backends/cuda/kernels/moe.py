"""The mixture-of-experts MLP on the GPU: routing in torch, experts as grouped Triton GEMMs.

Nothing here waits for the host (no ``.item()``, no data-dependent shapes),
so MoE steps are captured in CUDA graphs like dense ones. The ``T * k``
(token, expert) pairs are sorted by expert and laid out in row blocks of
``BLOCK_M``, each expert's rows padded to a whole number of blocks::

    padded rows:   | e0 e0 e0 -- | e1 -- -- -- | e3 e3 e3 e3 | e3 -- -- -- | unused ... |
    block_expert:  |      0      |      1      |      3      |      3      |  E (skip)  |

The layout has a fixed upper bound (``cdiv(T*k, BLOCK_M) + E`` blocks), so
the grid never depends on the routing. One kernel runs every block's GEMM
with its expert's weight: ``gate_up`` over the tokens' rows, then (after the
activation) ``down`` over the padded rows. The weighted pair rows are summed
per token in ascending expert order, as transformers does.
``backends.torch_model.moe.moe_forward`` is the reference.
``grouped_gemm_launch`` is the GEMM's launch without running it (for
``kernels.variants``: two shapes, gate_up and down, per block height).
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from backends.cuda.kernels.launch import KernelLaunch
from model.config import ModelConfig

BLOCK_N = 64
BLOCK_K = 32


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, out_ptr, a_rows_ptr, block_expert_ptr, num_experts, N, K,
    stride_am, stride_we, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < num_experts:
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)                              # [M] padded rows
        src = tl.load(a_rows_ptr + rows)                                            # [M] input row (-1: padding)
        valid = src >= 0
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)                      # [N] output columns
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + src[:, None].to(tl.int64) * stride_am + kk[None, :],
                        mask=valid[:, None] & (kk[None, :] < K), other=0.0)          # [M, BK]
            w = tl.load(w_base + n[None, :].to(tl.int64) * stride_wn + kk[:, None],
                        mask=(n[None, :] < N) & (kk[:, None] < K), other=0.0)        # [BK, N]
            if DOT_FP32:
                acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=n[None, :] < N)


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, a_rows: torch.Tensor, block_expert: torch.Tensor,
                 block_m: int) -> torch.Tensor:
    """``out[r] = a[a_rows[r]] @ w[block_expert[r // block_m]].T`` for every padded row ``r`` of a used block.

    ``a`` ``[M, K]``, ``w`` ``[E, N, K]``, ``a_rows`` ``[R]`` int32 (-1: a
    padding row, zero), ``block_expert`` ``[R / block_m]`` int32 (E: unused
    block, left unwritten). Returns ``[R, N]`` in ``a.dtype``.
    """
    if a.stride(1) != 1 or w.stride(2) != 1:
        raise ValueError("a and w need a contiguous last dim")
    out = torch.empty((a_rows.shape[0], w.shape[1]), dtype=a.dtype, device=a.device)  # [R, N]
    grouped_gemm_launch(a, w, out, a_rows, block_expert, block_m).run()
    return out


def grouped_gemm_launch(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, a_rows: torch.Tensor,
                        block_expert: torch.Tensor, block_m: int) -> KernelLaunch:
    """``grouped_gemm``'s launch into ``out`` ``[R, N]``: programs over (row blocks, N tiles)."""
    num_experts, n, k = w.shape
    dot_fp32 = a.dtype == torch.float32 or (a.device.type == "cpu" and a.dtype == torch.bfloat16)
    return KernelLaunch(
        _grouped_gemm_kernel, (block_expert.shape[0], triton.cdiv(n, BLOCK_N)),
        (a, w, out, a_rows, block_expert, num_experts, n, k, a.stride(0), w.stride(0), w.stride(1), out.stride(0)),
        dict(BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_FP32=dot_fp32, num_warps=4),
    )


def block_m_for(num_pairs: int) -> int:
    """Rows per block: 16 (what ``tl.dot`` needs) for decode-sized batches, 64 for prefill-sized ones."""
    return 64 if num_pairs >= 1024 else 16


def expert_layout(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """The padded block layout of the pairs ``ids`` ``[T, k]`` (see the module docstring).

    Returns ``(row_pair [R] int64: the pair (t * k + j) of each padded row or
    -1, block_expert [R / block_m] int32, pair_row [T*k] int64: the padded row
    of each pair)``, all computed on the device with static shapes.
    """
    flat = ids.reshape(-1)                                                         # [P]
    num_pairs = flat.shape[0]
    order = torch.argsort(flat, stable=True)                                       # [P]: pairs by expert
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(
        0, flat, torch.ones_like(flat))                                            # [E]
    padded = (counts + block_m - 1) // block_m * block_m                           # [E]
    pad_end = torch.cumsum(padded, 0)                                              # [E]
    sorted_experts = flat[order]                                                   # [P]
    rank = torch.arange(num_pairs, device=ids.device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
    dest = (pad_end - padded)[sorted_experts] + rank                               # [P]: padded row of sorted pair
    num_blocks = -(-num_pairs // block_m) + num_experts
    row_pair = torch.full((num_blocks * block_m,), -1, dtype=torch.int64, device=ids.device)
    row_pair[dest] = order
    starts = torch.arange(num_blocks, device=ids.device) * block_m                  # [B]
    block_expert = torch.searchsorted(pad_end, starts, right=True).to(torch.int32)  # [B]: E past the last
    pair_row = torch.empty_like(order)
    pair_row[order] = dest
    return row_pair, block_expert, pair_row


def fused_moe(x: torch.Tensor, router: torch.Tensor, experts_gate_up: torch.Tensor, experts_down: torch.Tensor,
              config: ModelConfig, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The routed experts of one MoE layer on ``x`` ``[T, hidden]``; ``[T, hidden]`` (no shared expert).

    ``router`` ``[E, hidden]``, ``experts_gate_up`` ``[E, 2I, hidden]``,
    ``experts_down`` ``[E, hidden, I]`` (``backends.torch_model`` layouts).
    """
    num_tokens, k = x.shape[0], config.num_experts_per_tok
    probs = torch.softmax((x @ router.t()).float(), dim=-1)                        # [T, E] float32
    weights, ids = torch.topk(probs, k, dim=-1)                                    # [T, k] each
    if config.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(x.dtype)
    block_m = block_m_for(num_tokens * k)
    row_pair, block_expert, pair_row = expert_layout(ids, config.num_experts, block_m)
    token_rows = torch.where(row_pair >= 0, row_pair // k, -1).to(torch.int32)     # [R]: the pair's token
    gate_up = grouped_gemm(x.contiguous(), experts_gate_up, token_rows, block_expert, block_m)  # [R, 2I]
    gate, up = gate_up.chunk(2, dim=-1)                                            # [R, I] each
    inter = (act(gate) * up).contiguous()                                          # [R, I]
    own_rows = torch.where(row_pair >= 0, torch.arange(row_pair.shape[0], device=x.device), -1).to(torch.int32)
    down = grouped_gemm(inter, experts_down, own_rows, block_expert, block_m)      # [R, hidden]
    by_expert, slot = ids.sort(dim=-1)                                             # [T, k]: ascending expert ids
    pairs = torch.arange(num_tokens, device=x.device)[:, None] * k + slot          # [T, k] pair index
    rows = down[pair_row[pairs.reshape(-1)]].view(num_tokens, k, -1)               # [T, k, hidden]
    rows = rows * weights.gather(1, slot)[..., None]                               # [T, k, hidden]
    out = rows[:, 0]
    for j in range(1, k):
        out = out + rows[:, j]                                                     # in ascending expert order
    return out                                                                     # [T, hidden]


def fused_moe_ref(x: torch.Tensor, router: torch.Tensor, experts_gate_up: torch.Tensor, experts_down: torch.Tensor,
                  config: ModelConfig, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Reference: ``backends.torch_model.moe.moe_forward`` (one GEMM pair per expert, ``F.linear``)."""
    from types import SimpleNamespace

    from backends.torch_model.moe import moe_forward

    w = SimpleNamespace(router=router, experts_gate_up=experts_gate_up, experts_down=experts_down,
                        shared_gate_up=None)
    return moe_forward(x, w, config, torch.nn.functional.linear, act)
