"""Every compiled form (variant) of the cuda backend's Triton kernels for one model.

Triton compiles a kernel once per combination of constexprs, warps and
argument types (and of the runtime integers it specialises on: equal to 1,
divisible by 16). ``kernel_variants`` lists the combinations the backend's
steps launch for a model shape and dtype, by calling each kernel module's
``*_launch`` function on ``meta`` tensors laid out as ``CUDAModel`` lays out
its buffers:

=========================  ===================================================
variant                    launched by
=========================  ===================================================
``rms_norm``               the first layer's input norm (no residual)
``rms_norm+residual``      every other norm, the final one included
``rotary``                 q and k heads inside the fused qkv buffer
``reshape_and_cache``      K/V of the qkv buffer into the paged cache
``attention decode sN``    decode-only steps with N KV splits
``merge_splits sN``        the same steps' merge, N > 1
``attention prefill``      any step with a chunk longer than one token
=========================  ===================================================

The ahead-of-time compile check (``kernels.aot``, ``scripts/kernel_report.py``)
compiles each of them for sm_90a without a GPU; the backend's start-up
warm-up (``TritonAttention.warmup_metadata``) launches the attention ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.cuda.kernels.launch import KernelLaunch
from backends.cuda.kernels.merge_splits import merge_splits_launch
from backends.cuda.kernels.paged_attention import paged_attention_launch, plan_attention, split_buffers
from backends.cuda.kernels.reshape_and_cache import reshape_and_cache_launch
from backends.cuda.kernels.rms_norm import rms_norm_launch
from backends.cuda.kernels.rotary import rotary_launch


@dataclass(frozen=True)
class KernelShapes:
    """What fixes the variants: the model's head and hidden sizes, the dtype, the cache and split plan."""

    num_heads: int                        # query heads
    num_kv_heads: int                     # KV heads (a divisor of num_heads)
    head_dim: int                         # D, even
    hidden_size: int                      # model width (the norms' rows)
    dtype: torch.dtype                    # model and KV cache dtype
    block_size: int = 16                  # tokens per KV block
    block_n: int = 64                     # keys per attention tile (TritonAttention.block_n)
    split_counts: tuple[int, ...] = (1,)  # KV split counts decode steps use (TritonAttention.split_counts)
    softcap: bool = False                 # attention scores soft-capped (Gemma 2): the SOFTCAP variants

    def __post_init__(self) -> None:
        if min(self.num_heads, self.num_kv_heads, self.head_dim, self.hidden_size, self.block_size) < 1:
            raise ValueError("sizes must be >= 1")
        if self.num_heads % self.num_kv_heads or self.head_dim % 2:
            raise ValueError("num_heads must be a multiple of num_kv_heads and head_dim even")
        if not self.split_counts or min(self.split_counts) < 1:
            raise ValueError(f"split_counts must be non-empty and >= 1, got {self.split_counts}")

    @property
    def num_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class KernelVariant:
    """One variant: a name for reports and the launch that compiles it."""

    name: str                             # e.g. "attention decode s4"
    launch: KernelLaunch                  # arguments on meta tensors (nothing runs)


def kernel_variants(shapes: KernelShapes, num_tokens: int = 3) -> list[KernelVariant]:
    """The variants a model of ``shapes`` launches (see the module docstring), one entry each."""
    s, dev, t = shapes, "meta", num_tokens
    h, hkv, d = s.num_heads, s.num_kv_heads, s.head_dim
    qkv = torch.empty((t, (h + 2 * hkv) * d), dtype=s.dtype, device=dev).view(t, h + 2 * hkv, d)  # [T, H+2Hkv, D]
    q, k, v = qkv[:, :h], qkv[:, h: h + hkv], qkv[:, h + hkv:]
    cache = torch.empty((4, s.block_size, hkv, d), dtype=s.dtype, device=dev)                     # [NB, BS, Hkv, D]
    attn = torch.empty((t, h * d), dtype=s.dtype, device=dev).view(t, h, d)                        # [T, H, D]
    x = torch.empty((t, s.hidden_size), dtype=s.dtype, device=dev)                                 # [T, hidden]
    weight = torch.empty(s.hidden_size, dtype=s.dtype, device=dev)
    int32 = dict(dtype=torch.int32, device=dev)
    slots = torch.empty(t, **int32)
    variants = [
        KernelVariant("rms_norm", rms_norm_launch(x, weight, 1e-5, None, torch.empty_like(x))),
        KernelVariant("rms_norm+residual", rms_norm_launch(x, weight, 1e-5, torch.empty_like(x), torch.empty_like(x))),
        KernelVariant("rotary", rotary_launch(qkv[:, : h + hkv], torch.empty(t, dtype=torch.int64, device=dev),
                                              torch.empty(d // 2, dtype=torch.float32, device=dev))),
        KernelVariant("reshape_and_cache", reshape_and_cache_launch(k, v, cache, cache, slots)),
    ]

    def attention(query_lens: list[int], num_splits: int) -> tuple[KernelLaunch, KernelLaunch | None]:
        num_requests = len(query_lens)
        plan = plan_attention(query_lens, s.num_group, dev, num_splits=num_splits, block_n=s.block_n)
        tables = torch.empty((num_requests, 8), **int32)
        lens, starts = torch.empty(num_requests, **int32), torch.empty(num_requests + 1, **int32)
        rows = sum(query_lens)
        part_out, part_lse = split_buffers(num_splits, rows, h, d, dev) if num_splits > 1 else (attn, attn)
        launch = paged_attention_launch(q[:rows], cache, cache, tables, lens, starts, d ** -0.5, plan, attn[:rows],
                                        part_out, part_lse, softcap=50.0 if s.softcap else None)
        merge = merge_splits_launch(part_out, part_lse, attn[:rows], starts, plan) if num_splits > 1 else None
        return launch, merge

    for splits in sorted(set(s.split_counts)):
        launch, merge = attention([1] * t, splits)
        variants.append(KernelVariant(f"attention decode s{splits}", launch))
        if merge is not None:
            variants.append(KernelVariant(f"merge_splits s{splits}", merge))
    variants.append(KernelVariant("attention prefill", attention([t], 1)[0]))
    return variants
