"""The GPU check's quantized-weight parts: (i) the W4A16/W8A16 GEMM's bandwidth, and 4-bit weights for (f).

(i) times ``kernels.quant_matmul`` at the decode shapes of Llama-3.1-8B
(``plan.quant_shapes``: fused qkv 6144x4096, o_proj 4096x4096, up 14336x4096,
down 4096x14336, as ``N x K``) for ``plan.quant_tokens`` rows of
activations, 4 and 8 bits in groups of 32 with float16 scales (the GGUF
Q4_0/Q4_1/Q8_0 layout), against the HBM peak, and against a bf16
``torch.mm`` of the same shape. Bytes moved: codes, scales and biases, plus
the activations and the output. Each case cycles through enough copies of
its weight to exceed the 60 MB L2 (so every launch reads HBM), the launches
replayed from one CUDA graph (``kernels.time_ms``).

``quantize_model`` makes the 4-bit copy of the random 8B-shaped model that
the quantized throughput run of (f) uses: every projection and the LM head
quantized on the GPU, affine per group (scale = (max - min) / (2^bits - 1),
bias = min, codes rounded to nearest: what ``mlx.core.quantize`` does), the
embedding and norms shared with the bf16 model.
"""

from __future__ import annotations

import torch

from bench.gpu_check.kernels import peak_bandwidth_gbs, time_ms
from bench.gpu_check.plan import CheckPlan
from bench.gpu_check.report import say

L2_BYTES = 60 << 20              # H100/H200 L2: each case cycles through more weight bytes than this


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int):
    """``QuantWeight`` of ``weight`` ``[N, K]``: affine per group of ``group_size``, float16 scales and biases."""
    from backends.torch_model.weights import QuantWeight

    n, k = weight.shape
    groups = weight.float().reshape(n, k // group_size, group_size)                       # [N, G, gs]
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    scales = ((high - low) / ((1 << bits) - 1)).clamp_min(1e-8).half()                    # [N, G, 1]
    biases = low.half()
    q = torch.round((groups - biases.float()) / scales.float()).clamp(0, (1 << bits) - 1).to(torch.int64)
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=weight.device, dtype=torch.int64) * bits
    words = (q.reshape(n, k // per_word, per_word) << shifts).sum(dim=-1)                # [N, K / per_word] < 2^32
    codes = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)       # the same 32 bits
    return QuantWeight(codes.contiguous(), scales[..., 0].contiguous(), biases[..., 0].contiguous(), bits,
                       group_size, weight.dtype)


def quantize_model(weights, bits: int, group_size: int):
    """A ``ModelWeights`` sharing ``weights``' embedding and norms, its projections and LM head quantized."""
    from backends.torch_model.weights import LayerWeights, ModelWeights

    layers = []
    with torch.no_grad():
        for layer in weights.layers:
            parts = dict(vars(layer))
            for name in ("qkv", "o_proj", "gate_up", "down"):
                parts[name] = quantize_weight(parts[name], bits, group_size)
            layers.append(LayerWeights(**parts))
        lm_head = quantize_weight(weights.lm_head, bits, group_size)
    return ModelWeights(embed=weights.embed, layers=layers, final_norm=weights.final_norm, lm_head=lm_head)


def _random_weight(n: int, k: int, bits: int, group_size: int, device: str, seed: int):
    """Random codes, scales and biases of an ``[n, k]`` weight (the timing does not depend on the values)."""
    from backends.torch_model.weights import QuantWeight

    g = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(-(1 << 31), (1 << 31) - 1, (n, k * bits // 32), generator=g, device=device,
                          dtype=torch.int64).to(torch.int32)
    scales = (torch.rand((n, k // group_size), generator=g, device=device) * 0.01).half()
    return QuantWeight(codes, scales, -scales * (1 << (bits - 1)), bits, group_size, torch.bfloat16)


def gemm_bandwidth(plan: CheckPlan) -> tuple[str, dict]:
    """(i) The quantized GEMM at 8B decode shapes: GB/s against the HBM peak, time against bf16 ``torch.mm``."""
    from backends.cuda.kernels.quant_matmul import quant_matmul

    on_gpu = plan.device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    peak = peak_bandwidth_gbs()
    say(f"W{{4,8}}A16, groups of {plan.quant_group}, float16 scales; peak {peak:.0f} GB/s; "
        f"weights cycled past the {L2_BYTES >> 20} MB L2")
    say(f"{'bits':>4} {'N':>6} {'K':>6} {'M':>3} {'copies':>6} {'MiB':>6} {'us':>8} {'GB/s':>7} {'% peak':>7} "
        f"{'bf16 us':>8} {'speed-up':>8}")
    rows = []
    for bits in plan.quant_bits:
        for n, k in plan.quant_shapes:
            one = _random_weight(n, k, bits, plan.quant_group, plan.device, seed=n + k)
            copies = max(1, -(-2 * L2_BYTES // one.nbytes)) if on_gpu else 1
            ws = [one] + [_random_weight(n, k, bits, plan.quant_group, plan.device, seed=n + k + i)
                          for i in range(1, copies)]
            dense = [torch.randn((n, k), device=plan.device, dtype=dtype)
                     for _ in range(max(1, -(-2 * L2_BYTES // (n * k * 2))) if on_gpu else 1)]
            for m in plan.quant_tokens:
                x = torch.randn((m, k), device=plan.device, dtype=dtype)
                out = torch.empty((m, n), device=plan.device, dtype=dtype)

                def quantized():
                    for w in ws:
                        quant_matmul(x, w.codes, w.scales, w.biases, bits, plan.quant_group, out=out)

                def reference():
                    for w in dense:
                        torch.mm(x, w.t(), out=out)

                us = 1000 * time_ms(quantized, plan) / len(ws)
                bf16_us = 1000 * time_ms(reference, plan) / len(dense)
                moved = one.nbytes + x.numel() * x.element_size() + out.numel() * out.element_size()
                gbs = moved / us / 1e3
                rows.append({"bits": bits, "n": n, "k": k, "m": m, "us": round(us, 2), "gb_s": round(gbs, 1),
                             "pct_peak": round(100 * gbs / peak, 1), "bf16_us": round(bf16_us, 2),
                             "speedup_vs_bf16": round(bf16_us / us, 2)})
                say(f"{bits:>4} {n:>6} {k:>6} {m:>3} {len(ws):>6} {moved / 2**20:>6.1f} {us:>8.1f} {gbs:>7.0f} "
                    f"{100 * gbs / peak:>6.1f}% {bf16_us:>8.1f} {bf16_us / us:>7.2f}x")
            del ws, dense
    summary = []
    for bits in plan.quant_bits:
        mine = [r for r in rows if r["bits"] == bits]
        best = max(mine, key=lambda r: r["gb_s"])
        at_one = [r["pct_peak"] for r in mine if r["m"] == min(plan.quant_tokens)]
        summary.append(f"W{bits}: best {best['gb_s']:.0f} GB/s ({best['pct_peak']:.0f}% of peak, {best['n']}x"
                       f"{best['k']} M={best['m']}), M={min(plan.quant_tokens)} {min(at_one):.0f}-{max(at_one):.0f}% "
                       f"of peak, {min(r['speedup_vs_bf16'] for r in mine):.1f}-"
                       f"{max(r['speedup_vs_bf16'] for r in mine):.1f}x bf16")
    return "; ".join(summary) + f" (peak {peak:.0f} GB/s)", {"peak_gb_s": peak, "cases": rows}
