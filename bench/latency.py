"""``pagedgen bench offline --latency``: one request alone, as one interactive user sees it.

One request (by default 128 prompt + 128 output tokens, greedy, EOS ignored;
``--input-len`` / ``--output-len`` when given) runs through the engine's step
loop after the usual warm-up. Reported:

- TTFT: from ``add_request`` to the step that produced the first token;
- TPOT: the gaps between the steps that produced the following tokens (mean
  and median), and output tokens/s over the request's whole latency;
- the decode step's breakdown at batch 1 (``bench.step_timers``): matmul,
  attention, the rest of the model, input preparation, sampler, engine, as
  mean ms per decode step and shares of it; the not-matmul share; and the
  per-step Python/dispatch overhead (the host work around the model).

The timers add a few microseconds per wrapped call; the step times are those
of the instrumented run. The process CPU time of a decode step is printed
too: on a busy machine, with one thread, it is the steadier figure. ``--profile-ops N`` (cpu) then runs the request's
prompt again for ``N`` decode steps under ``torch.profiler`` and prints the
operators with the most self time: what the "model other" part is made of.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from bench.datasets import BenchRequest, take
from bench.step_timers import OVERHEAD_PARTS, PARTS, Timers, breakdown, instrument, mlx_matmul_ms
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

DEFAULT_LEN = (128, 128)                  # prompt and output tokens when --input-len / --output-len are left
DATASET_DEFAULTS = ("32:256", "32:128")   # bench.datasets' --input-len / --output-len defaults


def latency_request(engine: LLMEngine, args, cfg) -> BenchRequest:
    """The one request: ``cfg`` with 128-token lengths where the flags were left at their defaults."""
    cfg = replace(cfg, name="random",
                  input_len=DEFAULT_LEN if args.input_len == DATASET_DEFAULTS[0] else cfg.input_len,
                  output_len=DEFAULT_LEN if args.output_len == DATASET_DEFAULTS[1] else cfg.output_len)
    tok = engine.tokenizer
    return take(cfg, 1, engine.model_config.vocab_size, tok.all_special_ids)[0].turns[0]


def run_latency(engine: LLMEngine, request: BenchRequest) -> dict:
    """Run ``request`` alone with the step timers on; every figure of the module docstring."""
    backend = engine.backend
    timers = Timers()
    restore = instrument(backend, timers)
    steps: list[tuple[float, dict, int]] = []       # (wall seconds, timer totals, tokens produced)
    cpu_s: list[float] = []                         # process CPU seconds per step (all threads)
    token_times: list[float] = []                   # seconds from add_request to each step that produced tokens
    try:
        t0 = time.perf_counter()
        engine.add_request("latency-0", **request.inputs(), sampling_params=SamplingParams(
            temperature=0.0, max_tokens=request.max_tokens, ignore_eos=request.ignore_eos))
        while engine.has_unfinished_requests():
            timers.reset()
            c0 = time.process_time()
            s = time.perf_counter()
            outputs = engine.step()
            e = time.perf_counter()
            cpu_s.append(time.process_time() - c0)
            n = sum(len(c.token_ids) for out in outputs for c in out.outputs)
            steps.append((e - s, dict(timers.totals), n))
            if n:
                token_times.append(e - t0)
    finally:
        restore()
    if len(token_times) < 2:
        raise ValueError("the latency mode needs at least 2 output tokens (--output-len)")
    first = next(i for i, (_, _, n) in enumerate(steps) if n)
    decode_idx = [i for i in range(first + 1, len(steps)) if steps[i][2]]
    decode = [steps[i] for i in decode_idx]
    mlx_matmul_s = mlx_matmul_ms(backend.model) / 1000.0 if backend.name == "metal" else 0.0
    parts = [breakdown(backend.name, totals, wall, mlx_matmul_s) for wall, totals, _ in decode]
    step_ms = float(np.mean([wall for wall, _, _ in decode])) * 1000.0
    mean_parts = {k: float(np.mean([p[k] for p in parts])) * 1000.0 for k in parts[0]}
    gaps = np.diff(token_times) * 1000.0
    out_tokens = sum(n for _, _, n in steps)
    native = [t.get("native_attention", 0.0) for _, t, _ in decode]
    return {
        "backend": backend.name, "dtype": engine.dtype,
        "prompt_tokens": len(request.prompt_token_ids), "output_tokens": out_tokens,
        "ttft_ms": token_times[0] * 1000.0, "e2e_s": token_times[-1],
        "tpot_mean_ms": float(gaps.mean()), "tpot_median_ms": float(np.median(gaps)),
        "output_tokens_per_s": out_tokens / token_times[-1],
        "prefill_steps": first + 1, "decode_steps": len(decode),
        "decode_step_ms": step_ms, "decode_step_median_ms": float(np.median([w for w, _, _ in decode])) * 1000.0,
        "decode_step_cpu_ms": float(np.mean([cpu_s[i] for i in decode_idx])) * 1000.0,
        "breakdown_ms": mean_parts,
        "shares": {k: v / step_ms for k, v in mean_parts.items()},
        "native_attention_ms": float(np.mean(native)) * 1000.0 if any(native) else None,
        "matmul_estimated": backend.name == "metal",
        # the fused layer calls are GEMMs with a few vector ops folded in: counted as matmul here
        "not_matmul_share": 1.0 - (mean_parts["matmul"] + mean_parts.get("fused_layer", 0.0)) / step_ms,
        "overhead_ms": sum(v for k, v in mean_parts.items() if k in OVERHEAD_PARTS),
    }


def profile_ops(engine: LLMEngine, request: BenchRequest, steps: int, rows: int = 15) -> str:
    """The top ``rows`` operators by self CPU time over ``steps`` decode steps of ``request``'s prompt (torch)."""
    import torch.profiler

    engine.scheduler.kv.reset_prefix_cache()
    engine.add_request("latency-profile", **request.inputs(), sampling_params=SamplingParams(
        temperature=0.0, max_tokens=steps + 1, ignore_eos=True))
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    started = False
    while engine.has_unfinished_requests():
        produced = any(c.token_ids for out in engine.step() for c in out.outputs)
        if produced and not started:                 # the first token is out: profile the decode steps only
            prof.start()
            started = True
    if started:
        prof.stop()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def format_latency(r: dict, title: str) -> str:
    """The latency figures as terminal lines."""
    lines = [title,
             f"  {r['prompt_tokens']} prompt + {r['output_tokens']} output tokens: TTFT {r['ttft_ms']:.1f} ms, "
             f"TPOT mean {r['tpot_mean_ms']:.2f} ms, median {r['tpot_median_ms']:.2f} ms, "
             f"{r['output_tokens_per_s']:.1f} output tok/s (request latency {r['e2e_s']:.2f} s)",
             f"  decode step at batch 1: mean {r['decode_step_ms']:.2f} ms over {r['decode_steps']} steps "
             f"(process CPU time {r['decode_step_cpu_ms']:.2f} ms, all threads)"
             + (" (MLX: matmul estimated from the model's weights at one row, indicative)"
                if r["matmul_estimated"] else "")]
    for key, ms in r["breakdown_ms"].items():
        extra = ""
        if key == "attention" and r["native_attention_ms"] is not None:
            extra = f"  (native decode kernel {r['native_attention_ms']:.2f} ms)"
        lines.append(f"    {PARTS[key]:<52} {ms:8.2f} ms {r['shares'][key]:6.1%}{extra}")
    lines.append(f"  not-matmul share of a decode step: {r['not_matmul_share']:.1%}; per-step Python/dispatch "
                 f"overhead ({r['backend']}, batch 1): {r['overhead_ms']:.2f} ms "
                 f"({r['overhead_ms'] / r['decode_step_ms']:.1%}: {', '.join(k for k in OVERHEAD_PARTS if k in r['breakdown_ms'])})")
    return "\n".join(lines)


def main(engine: LLMEngine, args, cfg, report: dict) -> dict:
    """The latency mode of ``bench offline``: warm up, run the request, print; the report's ``"latency"``."""
    request = latency_request(engine, args, cfg)
    if args.warmup:
        warm = BenchRequest(request.prompt_token_ids[:16], 4)
        engine.add_request("latency-warmup", **warm.inputs(), sampling_params=SamplingParams(
            temperature=0.0, max_tokens=warm.max_tokens, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        engine.scheduler.kv.reset_prefix_cache()
    result = run_latency(engine, request)
    report["latency"] = result
    title = f"pagedgen bench offline --latency: {engine.model.name} ({engine.backend_name}, {engine.dtype})"
    print(format_latency(result, title))
    if args.profile_ops:
        if engine.backend_name == "metal":
            print("  --profile-ops: torch.profiler sees no MLX operators; skipped on the metal backend")
        else:
            table = profile_ops(engine, request, args.profile_ops)
            result["profile_ops"] = table
            print(f"  operators by self CPU time over {args.profile_ops} decode steps (torch.profiler):")
            print(table)
    return result
