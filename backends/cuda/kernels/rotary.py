"""Rotary position embedding of q and k, in place, in the HF rotate-half layout.

``qk`` is ``[T, H + Hkv, D]`` (the q and k heads of the fused qkv output, a
strided view); token ``t`` at ``positions[t]`` is rotated by the angles
``positions[t] * inv_freq`` ``[D/2]``, computed in float32 in the kernel (no
cos/sin cache to build or keep)::

    x1, x2 = x[..., :D/2], x[..., D/2:]
    out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]

A program handles all heads of ``BLOCK_T`` tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.cuda.kernels.launch import KernelLaunch


@triton.jit(do_not_specialize=["num_tokens"])
def _rotary_kernel(
    qk_ptr, positions_ptr, inv_freq_ptr, num_tokens, stride_t, stride_h,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)            # [BT]
    j = tl.arange(0, BLOCK_HALF)
    pos = tl.load(positions_ptr + t, mask=t < num_tokens, other=0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + j, mask=j < HALF, other=0.0)
    freqs = pos[:, None] * inv_freq[None, :]                                         # [BT, BHALF]
    cos = tl.cos(freqs)[:, None, :]                                                  # [BT, 1, BHALF]
    sin = tl.sin(freqs)[:, None, :]
    t3 = t[:, None, None]
    h3 = tl.arange(0, BLOCK_H)[None, :, None]
    j3 = j[None, None, :]
    mask = (t3 < num_tokens) & (h3 < NUM_HEADS) & (j3 < HALF)
    base = qk_ptr + t3 * stride_t + h3 * stride_h + j3                               # [BT, BH, BHALF]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(base, (x1 * cos - x2 * sin).to(qk_ptr.dtype.element_ty), mask=mask)
    tl.store(base + HALF, (x2 * cos + x1 * sin).to(qk_ptr.dtype.element_ty), mask=mask)


def rotary_embedding(qk: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``qk`` ``[T, heads, D]`` in place by ``positions`` ``[T]`` and ``inv_freq`` ``[D/2]`` (float32)."""
    num_tokens, num_heads, head_dim = qk.shape
    if qk.stride(2) != 1 or head_dim % 2:
        raise ValueError("qk must be [T, heads, D] with an even, contiguous last dim")
    if num_tokens:
        rotary_launch(qk, positions, inv_freq).run()
    return qk


def rotary_launch(qk: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> KernelLaunch:
    """The rotation's launch: all heads of ``BLOCK_T`` tokens (about 2048 pairs) per program."""
    num_tokens, num_heads, head_dim = qk.shape
    block_h, block_half = triton.next_power_of_2(num_heads), triton.next_power_of_2(head_dim // 2)
    block_t = max(1, min(16, 2048 // (block_h * block_half)))
    return KernelLaunch(
        _rotary_kernel, (triton.cdiv(num_tokens, block_t),),
        (qk, positions, inv_freq, num_tokens, qk.stride(0), qk.stride(1)),
        dict(NUM_HEADS=num_heads, HALF=head_dim // 2, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half,
             num_warps=4),
    )


def rotary_embedding_ref(qk: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Reference: the same rotation in float32 torch, written back into ``qk``."""
    freqs = positions[:, None].float() * inv_freq[None, :].float()              # [T, D/2]
    cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]                 # [T, 1, D/2]
    half = qk.shape[-1] // 2
    x1, x2 = qk[..., :half].float(), qk[..., half:].float()                     # [T, H, D/2]
    qk.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(qk.dtype))
    return qk
