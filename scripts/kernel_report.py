"""Registers and spills of every Triton kernel variant the cuda backend launches, compiled for sm_90a.

No GPU needed: Triton compiles for a CUDA target with the ptxas its wheel
carries (``backends.cuda.kernels.aot``). One line per variant; exit status 1
with ``--check`` when any variant spills.

    .venv/bin/python scripts/kernel_report.py                       # 8B and the default model, 3 dtypes
    .venv/bin/python scripts/kernel_report.py --model llama-3.1-8b --dtype bfloat16 --kernel attention
    .venv/bin/python scripts/kernel_report.py --model mixtral-8x7b --dtype bfloat16 --quant 4:32:float16 \
        --kernel qmm --kernel moe                                    # packed projections, MoE experts
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)        # compile real kernels, whatever the caller's environment

import torch  # noqa: E402

from backends.cuda.attention import DEFAULT_BLOCK_N, TritonAttention  # noqa: E402
from backends.cuda.kernels.aot import compile_variant, ptxas_available  # noqa: E402
from backends.cuda.kernels.variants import KernelShapes, kernel_variants  # noqa: E402

# (query heads, KV heads, head_dim, hidden, soft-capped scores) of the shapes worth checking
MODELS = {
    "llama-3.1-8b": (32, 8, 128, 4096, False),
    "smollm2-135m": (9, 3, 64, 576, False),   # the embedded default model
    "qwen2.5-7b": (28, 4, 128, 3584, False),
    "gemma-2-9b": (16, 8, 256, 3584, True),
    "mixtral-8x7b": (32, 8, 128, 4096, False),
    "qwen3-30b-a3b": (32, 4, 128, 2048, False),
    "tiny": (4, 2, 16, 64, False),            # the tests' tiny Llama
}
# (intermediate, vocab, experts, expert intermediate): the GEMM shapes of packed projections and MoE experts
MLP = {
    "llama-3.1-8b": (14336, 128256, 0, 0), "smollm2-135m": (1536, 49152, 0, 0), "qwen2.5-7b": (18944, 152064, 0, 0),
    "gemma-2-9b": (14336, 256000, 0, 0), "mixtral-8x7b": (14336, 32000, 8, 14336),
    "qwen3-30b-a3b": (6144, 151936, 128, 768), "tiny": (128, 128, 0, 0),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_quant(text: str) -> tuple[int, int, torch.dtype]:
    """``BITS:GROUP:SCALE_DTYPE`` (e.g. ``4:32:float16``, a Q4_0/Q4_1 GGUF) -> ``(4, 32, torch.float16)``."""
    try:
        bits, group, scale = text.split(":")
        return int(bits), int(group), DTYPES[scale]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"--quant takes BITS:GROUP:SCALE_DTYPE such as 4:32:float16, got {text!r}")


def model_shapes(model: str, dtype: str, num_sms: int, max_model_len: int, block_size: int = 16,
                 splits: tuple[int, ...] | None = None,
                 quant: tuple[tuple[int, int, torch.dtype], ...] = ()) -> KernelShapes:
    """``KernelShapes`` of a named model as the backend would run it on a GPU of ``num_sms``.

    ``splits`` keeps only those of the split counts the backend would use;
    ``quant``: the packed projections' layouts (bits, group, scale dtype).
    """
    heads, kv_heads, head_dim, hidden, softcap = MODELS[model]
    intermediate, vocab, experts, expert_intermediate = MLP[model]
    attention = TritonAttention(heads, kv_heads, head_dim, num_sms=num_sms, block_n=DEFAULT_BLOCK_N)
    counts = attention.split_counts(max_model_len)
    if splits is not None:
        counts = [c for c in counts if c in splits]
    return KernelShapes(heads, kv_heads, head_dim, hidden, DTYPES[dtype], block_size=block_size,
                        block_n=attention.block_n, split_counts=tuple(counts), softcap=softcap, quant=quant,
                        intermediate_size=intermediate if quant and not experts else 0,
                        vocab_size=vocab if quant else 0, num_experts=experts,
                        moe_intermediate_size=expert_intermediate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=sorted(MODELS), help="default: llama-3.1-8b, smollm2-135m")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="default: all three")
    parser.add_argument("--kernel", action="append", default=[],
                        help="only variants whose name contains this (repeatable: any of them)")
    parser.add_argument("--quant", action="append", default=[], type=parse_quant,
                        help="also the quantized GEMM for packed projections of this layout, e.g. 4:32:float16 "
                             "(repeatable)")
    parser.add_argument("--num-sms", type=int, default=132, help="multiprocessors (H100/H200: 132)")
    parser.add_argument("--max-model-len", type=int, default=131072, help="longest context (sets the split counts)")
    parser.add_argument("--splits", help="only these KV split counts, e.g. 1,2,16 (default: all the backend uses)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 if any variant spills")
    args = parser.parse_args(argv)
    if not ptxas_available():
        print("this triton has no NVIDIA backend or ptxas: nothing to compile", file=sys.stderr)
        return 2
    import triton

    rows = []
    print(f"triton {triton.__version__}, target sm_90a, {args.num_sms} SMs, max_model_len {args.max_model_len}")
    print(f"{'model':<14} {'dtype':<9} {'variant':<24} {'warps':>5} {'regs':>5} {'spill st':>8} {'spill ld':>8} "
          f"{'stack':>6} {'shared':>7} {'s':>5}")
    for model in args.model or ["llama-3.1-8b", "smollm2-135m"]:
        for dtype in args.dtype or list(DTYPES):
            splits = tuple(int(x) for x in args.splits.split(",")) if args.splits else None
            shapes = model_shapes(model, dtype, args.num_sms, args.max_model_len, splits=splits,
                                  quant=tuple(args.quant))
            for variant in kernel_variants(shapes):
                if args.kernel and not any(k in variant.name for k in args.kernel):
                    continue
                r = compile_variant(variant.name, variant.launch)
                rows.append({"model": model, "dtype": dtype, "variant": r.name, "num_warps": r.num_warps,
                             "registers": r.registers, "spill_stores": r.spill_stores, "spill_loads": r.spill_loads,
                             "stack_bytes": r.stack_bytes, "shared_bytes": r.shared_bytes,
                             "seconds": round(r.seconds, 2)})
                print(f"{model:<14} {dtype:<9} {r.name:<24} {r.num_warps:>5} {r.registers:>5} {r.spill_stores:>8} "
                      f"{r.spill_loads:>8} {r.stack_bytes:>6} {r.shared_bytes:>7} {r.seconds:>5.1f}", flush=True)
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    print(f"{len(rows)} variants, {len(spilled)} spill" + "".join(
        f"\n  SPILLS: {r['model']} {r['dtype']} {r['variant']}: {r['spill_stores']} B" for r in spilled))
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "split_counts": list(shapes.split_counts),
                                         "variants": rows}, indent=1))
    return 1 if args.check and spilled else 0


if __name__ == "__main__":
    sys.exit(main())
