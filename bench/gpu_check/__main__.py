"""``python -m bench.gpu_check [--quick | --dry-run] [--skip LETTER]``: run the GPU check's sections in order.

Order: (a) tests, (b) decode bandwidth, (c) prefill, (i) quantized GEMM
bandwidth, (g) serve (cheap, and independent of the 8B model), then the
8B-shaped model: the HF reference and baseline, then (d) (e) (f) (h) for
each graph mode, then (f) once more with 4-bit weights in ``plan.quant_mode``.
A section that would not fit in the time left is skipped with a SUMMARY line
saying so.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from bench.gpu_check import kernels, modes, models, quant, serving
from bench.gpu_check.plan import DRY_RUN, FULL, QUICK, CheckPlan
from bench.gpu_check.report import Report, SectionResult, say

# about how long each part takes on an H200 (first Triton compiles included): below this, it is skipped
NEEDS_S = {"b": 30, "c": 15, "i": 20, "g": 45, "model": 60, "none": 45, "piecewise": 90, "full": 60, "quant": 75}


def versions() -> dict:
    """Device and package versions for the JSON summary."""
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86'})"
    return {"device": device, "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "transformers": transformers.__version__,
            "triton_interpret": os.environ.get("TRITON_INTERPRET")}


def run_modes(plan: CheckPlan, report: Report, work_dir: Path, skip: set[str]) -> None:
    """The 8B-shaped model: build it, the HF reference and baseline, then (d) (e) (f) (h) per mode."""
    holder: dict = {}

    def build() -> tuple[str, dict]:
        dtype = getattr(torch, plan.dtype)
        model = models.build_random_model(work_dir, plan.model, dtype, plan.device)
        holder["model"] = model
        holder["work"] = modes.prepare(plan, model)
        model.drop_hf_model()
        c = model.config
        params = sum(p.numel() for p in [model.weights.embed, model.weights.lm_head, *[
            t for layer in model.weights.layers for t in vars(layer).values() if t is not None]])
        figures = {"params": params, "hf_tokens_per_s": holder["work"].hf_tokens_per_s}
        return (f"{model.name}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads}/"
                f"{c.num_key_value_heads} heads, vocab {c.vocab_size}, {params / 1e9:.2f} B params in {plan.dtype}; "
                f"HF generate() {holder['work'].hf_tokens_per_s:.0f} output tok/s"), figures

    result = report.run("e/f", f"{plan.model} random model: HF reference logits (e), generate() baseline (f)", build,
                        NEEDS_S["model"])
    if result.status != "ok":
        return
    model, work, reference, tokens_per_s = holder["model"], holder["work"], {}, {}
    for mode in plan.modes:
        if report.remaining_s() < NEEDS_S[mode]:
            report.add(SectionResult("d", f"start-up and capture, {mode}", "skipped", 0.0,
                                     f"skipped: {report.remaining_s():.0f} s left, needs about {NEEDS_S[mode]}"))
            continue
        engine_box: dict = {}

        def start(mode=mode) -> tuple[str, dict]:
            engine, seconds = modes.start_engine(plan, model, mode)
            engine_box["engine"] = engine
            return modes.startup_figures(engine, seconds)

        if report.run("d", f"start-up and capture, {mode}", start).status != "ok":
            continue
        engine = engine_box["engine"]
        try:
            if "e" not in skip:
                report.run("e", f"logits vs HF transformers, {mode}", lambda: modes.parity_figures(
                    plan, engine, work, reference))
            if "f" not in skip:
                result = report.run("f", f"offline throughput, {mode}",
                                    lambda: modes.throughput_figures(plan, engine, work))
                tokens_per_s[mode] = result.figures.get("output_tokens_per_s")
            report.run("h", f"GPU memory vs budget, {mode}", lambda: modes.memory_figures(plan, engine))
        finally:
            modes.stop_engine(engine)                 # frees the KV cache and graphs before the next mode
            engine_box.clear()
    if plan.quant_mode is not None and "f" not in skip:
        report.run("f", f"offline throughput, 4-bit weights, {plan.quant_mode}",
                   lambda: modes.quantized_throughput_figures(plan, model, work, tokens_per_s.get(plan.quant_mode)),
                   NEEDS_S["quant"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU check of the cuda backend (bench/gpu_check/__init__.py)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="fewer cases and modes (about 4 minutes on an H200)")
    group.add_argument("--dry-run", action="store_true",
                       help="toy sizes on the CPU under TRITON_INTERPRET=1: imports and sets up every section")
    parser.add_argument("--skip", action="append", default=[], choices=list("abcdefghi"),
                        help="skip a section (repeatable; d skips the 8B model altogether)")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                        help="folder for gpu_check.json (default: $OUT when set)")
    args = parser.parse_args(argv)
    plan = DRY_RUN if args.dry_run else QUICK if args.quick else FULL
    if plan.device == "cuda" and not torch.cuda.is_available():
        say("no CUDA device: nothing to check (--dry-run checks the setup on the CPU)")
        return 2
    if plan.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        say("--dry-run needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
        return 2
    skip = set(args.skip)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    report = Report(plan.name, plan.time_limit_s, args.out / "gpu_check.json" if args.out else None, versions())
    say(f"gpu check, plan {plan.name}: " + ", ".join(f"{k} {v}" for k, v in report.context.items()))
    with tempfile.TemporaryDirectory(prefix="pagedgen-gpu-check-") as tmp:
        work_dir = Path(tmp)
        if "a" not in skip:
            report.run("a", "kernel tests" + (" (collected only)" if plan.device == "cpu" else " (native)"),
                       lambda: kernels.kernel_tests(plan))
        if "b" not in skip:
            report.run("b", "decode attention bandwidth", lambda: kernels.decode_bandwidth(plan), NEEDS_S["b"])
        if "c" not in skip:
            report.run("c", "prefill attention TFLOP/s", lambda: kernels.prefill_tflops(plan), NEEDS_S["c"])
        if "i" not in skip:
            report.run("i", "quantized GEMM bandwidth (W4A16 / W8A16, 8B decode shapes)",
                       lambda: quant.gemm_bandwidth(plan), NEEDS_S["i"])
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if "g" not in skip:
            report.run("g", f"pagedgen serve --backend {plan.serve_backend}, streamed Generate",
                       lambda: serving.serve_and_stream(plan, models.tiny_hf_dir(work_dir)), NEEDS_S["g"])
        if "d" not in skip:
            run_modes(plan, report, work_dir, skip)
    return report.close()


if __name__ == "__main__":
    sys.exit(main())
