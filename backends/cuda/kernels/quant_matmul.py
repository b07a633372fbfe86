"""Weight-only quantized GEMM: ``out = x @ dequantize(W).T`` with 4- or 8-bit weights.

W4A16 / W8A16: activations ``x [M, K]`` in float16 or bfloat16 (float32 too,
for tests), weights in the affine group layout of ``model.weights.quant`` (the
layout MLX's ``quantized_matmul`` reads)::

    codes   int32 (or uint32)  [N, K * bits / 32]   row n's codes, a little-endian bit stream
    scales  float              [N, K / group_size]
    biases  float              [N, K / group_size]   W[n, k] = scales[n, g] * q[n, k] + biases[n, g]

A program computes a ``BLOCK_M x BLOCK_N`` tile of ``out``, walking ``K`` in
steps of ``BLOCK_K``. Each step loads the step's words of its ``BLOCK_N``
weight rows once (``[BN, BK * bits / 32]``), shifts and masks the codes out in
registers, loads one scale and bias per 32-value slice, dequantizes in float32
(``scale * q + bias``, as the numpy reference does; fused into an FMA on a
GPU, which rounds the same wherever the product is exact, as it is for every
GGUF format) and rounds to the activation dtype for the tensor-core dot:
``out^T [BN, BM] += W [BN, BK] @ x^T [BK, BM]``, so the weight rows fill the
MMA's large side and a decode batch pads only up to ``BLOCK_M = 16``. The
accumulator is float32. The weight is read from HBM once per ``BLOCK_M`` rows
of ``x``, so at decode the kernel reads about ``bits / 16`` of the bytes a
float16 GEMM reads. ``K`` must be a multiple of 32 (the layout guarantees it:
groups are 32, 64 or 128); it need not be a multiple of ``BLOCK_K`` (the tail
is masked), nor need ``M`` or ``N`` be multiples of their tiles.

The launcher allocates only ``out`` (none when given), reads only shapes on
the host and never synchronizes, so it can be captured in a CUDA graph.
``quant_matmul_launch`` is its launch without running it, for
``kernels.variants`` (ahead-of-time compile checks). The kernel does not
specialise on ``M``, so each tile config compiles once per weight layout
whatever the batch (start-up compiles them all:
``CUDAModel.warm_up_kernels``). ``CONFIGS`` lists the tile variants, all
spill-free on sm_90a (at most 168 registers) for 4 and 8
bits, groups 32, 64 and 128, float16/bfloat16 activations and
float16/bfloat16/float32 scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from backends.cuda.kernels.launch import KernelLaunch

SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class QuantMatmulConfig:
    """Tile sizes and launch parameters of one kernel variant."""

    block_m: int        # rows of x (tokens) per program; at least 16 (the dot's minimum)
    block_n: int        # output features per program
    block_k: int        # reduction step; a multiple of 32
    num_warps: int      # warps per program
    num_stages: int     # software-pipelining depth of the K loop

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.block_k % 32:
            raise ValueError(f"block_k must be a multiple of 32, got {self.block_k}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"bad num_warps {self.num_warps} or num_stages {self.num_stages}")


# The variants choose_config picks from (also the list to AOT-compile for sm_90a).
DECODE_CONFIG = QuantMatmulConfig(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=4)
SMALL_BATCH_CONFIG = QuantMatmulConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4)
PREFILL_CONFIG = QuantMatmulConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3)
CONFIGS = (DECODE_CONFIG, SMALL_BATCH_CONFIG, PREFILL_CONFIG)


def choose_config(num_tokens: int) -> QuantMatmulConfig:
    """The variant for ``num_tokens`` rows of ``x``: narrow N tiles at decode (more programs), wider M tiles at prefill."""
    if num_tokens <= 16:
        return DECODE_CONFIG
    if num_tokens <= 64:
        return SMALL_BATCH_CONFIG
    return PREFILL_CONFIG


@triton.jit(do_not_specialize=["M"])     # one compiled form for every token count (M = 1 included)
def _quant_matmul_kernel(
    x_ptr, codes_ptr, scales_ptr, biases_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_cn, stride_sn, stride_bn, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    PER_WORD: tl.constexpr = 32 // BITS                  # codes per int32 word
    WORDS: tl.constexpr = BLOCK_K // PER_WORD            # words per row and K step
    SLICES: tl.constexpr = BLOCK_K // 32                 # 32-value slices per K step, each inside one group
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)                     # [BN]
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)                     # [BM]
    rows_n = offs_n.to(tl.int64)[:, None]                                           # [BN, 1]
    rows_m = offs_m.to(tl.int64)[:, None]                                           # [BM, 1]
    n_mask = offs_n[:, None] < N
    m_mask = offs_m[:, None] < M
    shifts = (tl.arange(0, PER_WORD) * BITS)[None, None, :]                         # [1, 1, PW]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)   # out^T: N takes the dot's M slot, so M=1 wastes little
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)                                         # [BK]
        x = tl.load(x_ptr + rows_m * stride_xm + offs_k[None, :],
                    mask=m_mask & (offs_k[None, :] < K), other=0.0)                 # [BM, BK]
        word_ids = k0 // PER_WORD + tl.arange(0, WORDS)[None, :]                    # [1, W]
        words = tl.load(codes_ptr + rows_n * stride_cn + word_ids,
                        mask=n_mask & (word_ids < K // PER_WORD), other=0)          # [BN, W]
        q = (words[:, :, None] >> shifts) & ((1 << BITS) - 1)                       # [BN, W, PW]
        # one scale and bias per 32-value slice (a group of 64 or 128 is read 2 or 4 times, from L1): the
        # same register layout for every group size, where loading one per group costs registers and spills
        slice_k = k0 + 32 * tl.arange(0, SLICES)[None, :]                          # [1, S]
        g_mask = n_mask & (slice_k < K)
        s = tl.load(scales_ptr + rows_n * stride_sn + slice_k // GROUP, mask=g_mask, other=0.0)   # [BN, S]
        b = tl.load(biases_ptr + rows_n * stride_bn + slice_k // GROUP, mask=g_mask, other=0.0)
        q = tl.reshape(q, (BLOCK_N, SLICES, 32)).to(tl.float32)                     # [BN, S, 32]
        w = q * s.to(tl.float32)[:, :, None] + b.to(tl.float32)[:, :, None]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(x_ptr.dtype.element_ty)            # [BN, BK]
        if x_ptr.dtype.element_ty == tl.float32:
            acc += tl.dot(w, tl.trans(x), input_precision="ieee")
        else:
            acc += tl.dot(w, tl.trans(x))                                           # [BN, BM], fp32 accumulate
    out_offs = offs_m.to(tl.int64)[None, :] * stride_om + rows_n                    # [BN, BM]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=n_mask & (offs_m[None, :] < M))


def quant_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor,
                 bits: int, group_size: int, out: torch.Tensor | None = None,
                 config: QuantMatmulConfig | None = None) -> torch.Tensor:
    """``out [M, N] = x [M, K] @ W.T``, W ``[N, K]`` given by ``codes``/``scales``/``biases`` (module docstring).

    ``config`` defaults to ``choose_config(M)``.
    """
    num_tokens, _, out_features = _check(x, codes, scales, biases, bits, group_size, out)
    if out is None:
        out = torch.empty((num_tokens, out_features), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    quant_matmul_launch(x, codes, scales, biases, bits, group_size, out, config or choose_config(num_tokens)).run()
    return out


def quant_matmul_launch(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor,
                        bits: int, group_size: int, out: torch.Tensor, config: QuantMatmulConfig) -> KernelLaunch:
    """The GEMM's launch: programs over (N tiles, M tiles), constexprs from ``bits``, the group and ``config``."""
    num_tokens, in_features = x.shape
    out_features = codes.shape[0]
    if codes.dtype == torch.uint32:
        codes = codes.view(torch.int32)                   # same bits; shifts are masked, so the sign does not matter
    return KernelLaunch(
        _quant_matmul_kernel, (triton.cdiv(out_features, config.block_n), triton.cdiv(num_tokens, config.block_m)),
        (x, codes, scales, biases, out, num_tokens, out_features, in_features,
         x.stride(0), codes.stride(0), scales.stride(0), biases.stride(0), out.stride(0)),
        dict(BITS=bits, GROUP=group_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
             num_warps=config.num_warps, num_stages=config.num_stages),
    )


def quant_matmul_ref(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor,
                     bits: int, group_size: int, out: torch.Tensor | None = None,
                     config: QuantMatmulConfig | None = None) -> torch.Tensor:
    """Reference: dequantize W to the activation dtype, then a float32 matmul (``config`` is ignored)."""
    _check(x, codes, scales, biases, bits, group_size, out)
    weight = dequantize_weight(codes, scales, biases, bits, group_size, x.dtype)      # [N, K]
    result = (x.float() @ weight.float().T).to(x.dtype)                               # [M, N]
    if out is None:
        return result
    out.copy_(result)
    return out


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
                      group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """W ``[N, K]`` in ``dtype``: ``scale * q + bias`` in float32, then rounded (an embedding lookup's rows too)."""
    per_word = 32 // bits
    words = codes.view(torch.int32) if codes.dtype == torch.uint32 else codes                   # [N, K / per_word]
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int32) * bits
    q = ((words[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(codes.shape[0], -1)        # [N, K]
    groups = q.shape[1] // group_size
    q = q.reshape(codes.shape[0], groups, group_size).float()                                   # [N, G, gs]
    weight = q * scales.float()[:, :, None] + biases.float()[:, :, None]
    return weight.reshape(codes.shape[0], -1).to(dtype)


def _check(x, codes, scales, biases, bits, group_size, out) -> tuple[int, int, int]:
    """``(M, K, N)`` after checking shapes, dtypes and strides; ValueError otherwise."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size % 32 or group_size <= 0:
        raise ValueError(f"group_size must be a positive multiple of 32, got {group_size}")
    if x.ndim != 2 or x.stride(1) != 1 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be [M, K] float16/bfloat16/float32 with a contiguous last dim, "
                         f"got {x.dtype} {tuple(x.shape)}")
    num_tokens, in_features = x.shape
    out_features = codes.shape[0]
    if codes.dtype not in (torch.int32, torch.uint32) or codes.shape != (out_features, in_features * bits // 32):
        raise ValueError(f"codes must be int32/uint32 [N, {in_features * bits // 32}], "
                         f"got {codes.dtype} {tuple(codes.shape)}")
    groups = in_features // group_size
    if in_features % group_size or scales.shape != (out_features, groups) or biases.shape != (out_features, groups):
        raise ValueError(f"scales and biases must be [{out_features}, {groups}], "
                         f"got {tuple(scales.shape)}, {tuple(biases.shape)}")
    if any(t.stride(1) != 1 for t in (codes, scales, biases)):
        raise ValueError("codes, scales and biases need a contiguous last dim")
    if out is not None and (out.shape != (num_tokens, out_features) or out.dtype != x.dtype or out.stride(1) != 1):
        raise ValueError(f"out must be [{num_tokens}, {out_features}] {x.dtype} with a contiguous last dim")
    return num_tokens, in_features, out_features
