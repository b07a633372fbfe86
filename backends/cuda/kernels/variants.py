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
``qmm w4g32 fp16 decode``  a projection kept packed (``quant``: bits, group,
                           scale dtype) at each GEMM tile config (decode /
                           small / prefill); a projection whose sizes
                           specialise differently gets its own entry
``moe m16 gate_up``        the grouped expert GEMMs (MoE models) per block
                           height (16 and 64 rows) and shape
=========================  ===================================================

Soft-capped models (Gemma 2: ``softcap``) launch the ``SOFTCAP`` forms of
every attention variant instead.

The ahead-of-time compile check (``kernels.aot``, ``scripts/kernel_report.py``)
compiles each of them for sm_90a without a GPU; the backend's start-up
warm-up launches them all (``TritonAttention.warmup_metadata`` steps, then
``CUDAModel.warm_up_kernels`` for the GEMM configs and MoE heights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.cuda.kernels.aot import variant_key
from backends.cuda.kernels.launch import KernelLaunch
from backends.cuda.kernels.merge_splits import merge_splits_launch
from backends.cuda.kernels.moe import block_m_for, grouped_gemm_launch
from backends.cuda.kernels.paged_attention import paged_attention_launch, plan_attention, split_buffers
from backends.cuda.kernels.quant_matmul import (DECODE_CONFIG, PREFILL_CONFIG, SMALL_BATCH_CONFIG,
                                                quant_matmul_launch)
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
    quant: tuple[tuple[int, int, torch.dtype], ...] = ()   # (bits, group, scale dtype) of packed projections
    intermediate_size: int = 0            # dense MLP width (the packed gate_up / down; 0: none packed)
    vocab_size: int = 0                   # the packed LM head's rows (0: not packed)
    num_experts: int = 0                  # MoE: experts per layer (0: dense)
    moe_intermediate_size: int = 0        # MoE: each expert's MLP width

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
    return variants + quant_variants(s, t) + moe_variants(s)


QUANT_CONFIG_NAMES = {DECODE_CONFIG: "decode", SMALL_BATCH_CONFIG: "small", PREFILL_CONFIG: "prefill"}
SCALE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _distinct(named_launches: list[tuple[str, str, KernelLaunch]]) -> list[KernelVariant]:
    """One variant per distinct compiled form, named ``base`` (plus the part's name after the first form)."""
    seen, bases, out = set(), set(), []
    for base, part, launch in named_launches:
        key = variant_key(launch)
        if key in seen:
            continue
        seen.add(key)
        out.append(KernelVariant(base if base not in bases else f"{base} {part}", launch))
        bases.add(base)
    return out


def quant_variants(s: KernelShapes, num_tokens: int) -> list[KernelVariant]:
    """The W4A16/W8A16 GEMM per packed layout, tile config and distinct projection shape (CUDAModel._mm)."""
    h, hkv, d, hidden = s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size
    projections = {"qkv": ((h + 2 * hkv) * d, hidden), "o_proj": (hidden, h * d)}
    if s.intermediate_size:
        projections.update(gate_up=(2 * s.intermediate_size, hidden), down=(hidden, s.intermediate_size))
    if s.vocab_size:
        projections["lm_head"] = (s.vocab_size, hidden)
    launches = []
    for bits, group, scale_dtype in s.quant:
        for config, config_name in QUANT_CONFIG_NAMES.items():
            base = f"qmm w{bits}g{group} {SCALE_NAMES[scale_dtype]} {config_name}"
            for part, (n, k) in projections.items():
                x = torch.empty((num_tokens, k), dtype=s.dtype, device="meta")                 # [T, K]
                codes = torch.empty((n, k * bits // 32), dtype=torch.int32, device="meta")     # [N, K * bits / 32]
                scales = torch.empty((n, k // group), dtype=scale_dtype, device="meta")        # [N, K / group]
                out = torch.empty((num_tokens, n), dtype=s.dtype, device="meta")
                launches.append((base, part, quant_matmul_launch(x, codes, scales, scales, bits, group, out, config)))
    return _distinct(launches)


def moe_variants(s: KernelShapes) -> list[KernelVariant]:
    """The grouped expert GEMMs (``moe.fused_moe``): gate_up and down at each block height."""
    if not s.num_experts:
        return []
    e, hidden, inter = s.num_experts, s.hidden_size, s.moe_intermediate_size
    launches = []
    for block_m in sorted({block_m_for(1), block_m_for(1 << 20)}):
        rows = torch.empty(4 * block_m, dtype=torch.int32, device="meta")
        blocks = torch.empty(4, dtype=torch.int32, device="meta")
        for part, (n, k) in {"gate_up": (2 * inter, hidden), "down": (hidden, inter)}.items():
            a = torch.empty((4 * block_m, k), dtype=s.dtype, device="meta")
            w = torch.empty((e, n, k), dtype=s.dtype, device="meta")
            out = torch.empty((4 * block_m, n), dtype=s.dtype, device="meta")
            launches.append((f"moe m{block_m} {part}", part, grouped_gemm_launch(a, w, out, rows, blocks, block_m)))
    return _distinct(launches)
