"""Write the step's new K/V into their paged cache slots.

Cache of one layer: ``k_cache``/``v_cache`` ``[num_blocks, block_size,
num_kv_heads, head_dim]``; slot ``s`` is ``(s // block_size, s % block_size)``.
Token ``i`` goes to ``slot_mapping[i]``; a negative slot (a padded row of a
CUDA graph batch) is skipped. A program copies the ``[Hkv, D]`` K and V rows of
``BLOCK_T`` tokens (the inputs may be strided views of the fused qkv output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.cuda.kernels.launch import KernelLaunch


@triton.jit(do_not_specialize=["num_tokens"])
def _reshape_and_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, num_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)            # [BT]
    slot = tl.load(slot_mapping_ptr + t, mask=t < num_tokens, other=-1).to(tl.int64)
    block = (tl.maximum(slot, 0) // BLOCK_SIZE)[:, None, None]                       # [BT, 1, 1]
    offset = (tl.maximum(slot, 0) % BLOCK_SIZE)[:, None, None]
    t3 = t[:, None, None]
    h = tl.arange(0, BLOCK_H)[None, :, None]                                         # [1, BH, 1]
    d = tl.arange(0, BLOCK_D)[None, None, :]                                         # [1, 1, BD]
    mask = (slot[:, None, None] >= 0) & (h < NUM_KV_HEADS) & (d < HEAD_DIM)         # padding: nothing moves
    key = tl.load(k_ptr + t3 * stride_kt + h * stride_kh + d, mask=mask)              # [BT, BH, BD]
    value = tl.load(v_ptr + t3 * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(k_cache_ptr + block * stride_kcb + offset * stride_kcs + h * stride_kch + d,
             key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vcs + h * stride_vch + d,
             value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Copy ``k``/``v`` ``[T, Hkv, D]`` into the caches at ``slot_mapping`` ``[T]`` (int32/int64, -1 skips)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("k and v must be [T, Hkv, D] with a contiguous last dim")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the caches must have a contiguous last dim")
    if num_tokens == 0:
        return
    reshape_and_cache_launch(k, v, k_cache, v_cache, slot_mapping).run()


def reshape_and_cache_launch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             slot_mapping: torch.Tensor) -> KernelLaunch:
    """The cache write's launch: ``BLOCK_T`` tokens (about 2048 elements of K) per program."""
    num_tokens, num_kv_heads, head_dim = k.shape
    block_h, block_d = triton.next_power_of_2(num_kv_heads), triton.next_power_of_2(head_dim)
    block_t = max(1, min(16, 2048 // (block_h * block_d)))
    return KernelLaunch(
        _reshape_and_cache_kernel, (triton.cdiv(num_tokens, block_t),),
        (k, v, k_cache, v_cache, slot_mapping, num_tokens,
         k.stride(0), k.stride(1), v.stride(0), v.stride(1),
         k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
         v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)),
        dict(NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
             BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4),
    )


def reshape_and_cache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """Reference: ``write_kv_cache_ref`` of the cpu backend, skipping negative slots."""
    from backends.cpu.attention import write_kv_cache_ref

    keep = (slot_mapping >= 0).nonzero()[:, 0]                                  # [T']
    write_kv_cache_ref(k_cache, v_cache, k[keep].to(k_cache.dtype), v[keep].to(v_cache.dtype),
                       slot_mapping[keep])
