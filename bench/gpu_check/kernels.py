"""Sections (a)-(c) of the GPU check: the kernel tests natively, decode bandwidth, prefill TFLOP/s."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time

import torch

from bench.gpu_check.plan import CheckPlan
from bench.gpu_check.report import say

PEAK_HBM_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}   # vendor datasheets
BLOCK_SIZE = 16


def kernel_tests(plan: CheckPlan) -> tuple[str, dict]:
    """(a) ``pytest tests/backends/cuda`` in a child process (natively on a GPU: bf16 included)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/backends/cuda", *plan.test_args]
    env = dict(os.environ)
    if plan.device == "cuda":
        env.pop("TRITON_INTERPRET", None)
        if importlib.util.find_spec("xdist") is not None:     # pytest-xdist: first compiles run side by side
            cmd += ["-n", "8"]
    result = subprocess.run(cmd, timeout=plan.test_timeout_s, capture_output=True, text=True, env=env)
    lines = result.stdout.strip().splitlines()
    say("\n".join(lines[-25:]))
    if result.returncode != 0:
        say(result.stderr[-3000:])
        raise RuntimeError(f"kernel tests failed (exit {result.returncode}): {lines[-1] if lines else ''}")
    per_file = {f: int(n) for f, n in (re.fullmatch(r"(\S+\.py): (\d+)", line).groups() for line in lines
                                       if re.fullmatch(r"\S+\.py: \d+", line))}
    if "--collect-only" in plan.test_args:                                      # the dry run: imports only
        return f"{sum(per_file.values())} tests collected in {len(per_file)} files", {"collected": per_file}
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|xfailed|errors?)", lines[-1])}
    return lines[-1], counts


def peak_bandwidth_gbs() -> float:
    """The HBM peak of this GPU by name (H200 when unknown)."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_HBM_GBS.items() if k in name), 4800.0)


def time_ms(fn, plan: CheckPlan, replays: int = 5) -> float:
    """Milliseconds per ``fn()``: on a GPU ``timed_iters`` calls captured in one CUDA graph and replayed."""
    fn()                                                                        # compile, warm up
    if plan.device != "cuda":
        t0 = time.perf_counter()
        for _ in range(plan.timed_iters):
            fn()
        return 1000 * (time.perf_counter() - t0) / plan.timed_iters
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(plan.timed_iters):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * plan.timed_iters)


def _attention_case(plan: CheckPlan, query_lens: list[int], context_lens: list[int], seed: int):
    """Caches, queries and metadata of one timed case (blocks in random order, cache writes skipped)."""
    from backends.cuda.attention import DEFAULT_BLOCK_N, TritonAttention

    heads, kv_heads, head_dim = plan.attention_heads
    dtype = torch.bfloat16 if plan.device == "cuda" else torch.float32
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count if plan.device == "cuda" else 1
    g = torch.Generator(device=plan.device).manual_seed(seed)
    per_request = [-(-c // BLOCK_SIZE) for c in context_lens]
    num_blocks = sum(per_request)
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g, device=plan.device, dtype=torch.float32).to(dtype)
    v_cache = torch.randn(shape, generator=g, device=plan.device, dtype=torch.float32).to(dtype)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, start = [], 0
    for n in per_request:
        tables.append(order[start:start + n])
        start += n
    attention = TritonAttention(heads, kv_heads, head_dim, num_sms=num_sms, block_n=DEFAULT_BLOCK_N)
    metadata = attention.build_metadata(query_lens, [c - q for c, q in zip(context_lens, query_lens)], tables,
                                        [-1] * sum(query_lens), plan.device)
    q = torch.randn((sum(query_lens), heads, head_dim), generator=g, device=plan.device).to(dtype)  # [T, H, D]
    return attention, metadata, q, k_cache, v_cache


def decode_bandwidth(plan: CheckPlan) -> tuple[str, dict]:
    """(b) Paged decode attention: bytes of K/V read per second against the HBM peak."""
    from backends.cuda.kernels.paged_attention import paged_attention

    peak = peak_bandwidth_gbs()
    heads, kv_heads, head_dim = plan.attention_heads
    say(f"{heads} query / {kv_heads} KV heads x {head_dim}, blocks of {BLOCK_SIZE}; peak {peak:.0f} GB/s")
    say(f"{'batch':>6} {'context':>8} {'splits':>6} {'KV MiB':>8} {'us':>9} {'GB/s':>8} {'% peak':>7}")
    rows = []
    for i, (batch, context) in enumerate(plan.decode_cases):
        attention, md, q, k_cache, v_cache = _attention_case(plan, [1] * batch, [context] * batch, seed=i)
        out = torch.empty_like(q)
        ms = time_ms(lambda: paged_attention(q, k_cache, v_cache, md.block_tables, md.context_lens,
                                             md.query_start_locs, attention.scale, md.plan, out), plan)
        moved = 2 * batch * context * kv_heads * head_dim * k_cache.element_size() + 2 * q.numel() * q.element_size()
        gbs = moved / ms / 1e6
        rows.append({"batch": batch, "context": context, "splits": md.plan.num_splits, "us": round(1000 * ms, 2),
                     "gb_s": round(gbs, 1), "pct_peak": round(100 * gbs / peak, 1)})
        say(f"{batch:>6} {context:>8} {md.plan.num_splits:>6} {moved / 2**20:>8.0f} {1000 * ms:>9.1f} {gbs:>8.0f} "
            f"{100 * gbs / peak:>6.1f}%")
    summary = ", ".join(f"{r['batch']}x{r['context']}: {r['gb_s']:.0f} GB/s ({r['pct_peak']:.0f}%)" for r in rows)
    return summary + f" of {peak:.0f} GB/s", {"peak_gb_s": peak, "cases": rows}


def prefill_tflops(plan: CheckPlan) -> tuple[str, dict]:
    """(c) Causal prefill attention over the paged cache: TFLOP/s of the two matmuls."""
    from backends.cuda.kernels.paged_attention import paged_attention

    heads, _, head_dim = plan.attention_heads
    say(f"{'requests':>8} {'length':>7} {'ms':>9} {'TFLOP/s':>8}")
    rows = []
    for i, (num_requests, length) in enumerate(plan.prefill_cases):
        attention, md, q, k_cache, v_cache = _attention_case(plan, [length] * num_requests,
                                                             [length] * num_requests, seed=100 + i)
        out = torch.empty_like(q)
        ms = time_ms(lambda: paged_attention(q, k_cache, v_cache, md.block_tables, md.context_lens,
                                             md.query_start_locs, attention.scale, md.plan, out), plan)
        flops = num_requests * 4 * heads * head_dim * length * (length + 1) / 2     # QK^T and PV, causal
        tflops = flops / ms / 1e9
        rows.append({"requests": num_requests, "length": length, "ms": round(ms, 3), "tflops": round(tflops, 1)})
        say(f"{num_requests:>8} {length:>7} {ms:>9.3f} {tflops:>8.1f}")
    return ", ".join(f"{r['requests']}x{r['length']}: {r['tflops']:.0f} TFLOP/s" for r in rows), {"cases": rows}
