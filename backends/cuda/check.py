"""GPU check of the cuda backend: one call, no network, under 8 minutes on one H200.

Run ``scripts/gpu_check.sh`` (or ``PYTHONPATH=. python -m backends.cuda.check [--quick]``).
Sections, each on its own (a failure is printed and the next one runs):

1. kernel tests: ``tests/backends/cuda`` natively (bfloat16 included, GPU-only tests too);
2. paged decode attention bandwidth: batch 1/16/64/256 x context 1k/4k/16k on
   Llama-3.1-8B shapes (32 query / 8 KV heads of 128, bfloat16), as % of HBM peak;
3. a Llama-3.1-8B-shaped model with random bfloat16 weights built on the GPU:
   for cuda_graph_mode none / piecewise / full: KV sizing, capture of every
   graph size with its time, decode step latency at batch 1 and 8, offline
   throughput (requests with input and output lengths uniform in [100, 1024]);
4. Hugging Face transformers ``generate()`` on the same shapes, random weights,
   the same workload (a prefix of it), and the ratio;
5. greedy parity of the cuda backend with the cpu backend on the default model.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
import traceback

import numpy as np
import torch

PEAK_HBM_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SUMMARY: list[str] = []


def say(*parts) -> None:
    print(*parts, flush=True)


def section(title: str, fn, *args) -> None:
    say(f"\n=== {title} ===")
    t0 = time.perf_counter()
    try:
        fn(*args)
        SUMMARY.append(f"{title}: done in {time.perf_counter() - t0:.1f} s")
    except Exception as e:  # noqa: BLE001 - report and go on with the next section
        traceback.print_exc()
        say(f"FAILED: {title}: {e!r}")
        SUMMARY.append(f"{title}: FAILED ({e!r:.120})")
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def peak_bandwidth() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_HBM_GBS.items() if k in name), 4800.0)


# -- 1. kernel tests ---------------------------------------------------------------


def kernel_tests(quick: bool) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/backends/cuda"]
    result = subprocess.run(cmd, timeout=240, capture_output=True, text=True)
    say("\n".join(result.stdout.strip().splitlines()[-25:]))
    if result.returncode != 0:
        say(result.stderr[-3000:])
        raise RuntimeError(f"kernel tests failed (exit {result.returncode})")


# -- 2. decode attention bandwidth ---------------------------------------------------


def time_ms(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def attention_bandwidth(quick: bool) -> None:
    from backends.cuda.kernels.paged_attention import choose_num_splits, paged_attention, plan_attention

    heads, kv_heads, head_dim, bs, dtype = 32, 8, 128, 16, torch.bfloat16
    batches = (1, 64) if quick else (1, 16, 64, 256)
    contexts = (1024, 4096) if quick else (1024, 4096, 16384)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    peak = peak_bandwidth()
    max_blocks = max(batches) * max(contexts) // bs
    shape = (max_blocks, bs, kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device="cuda")
    v_cache = torch.randn(shape, dtype=dtype, device="cuda")
    perm = torch.randperm(max_blocks, device="cuda").to(torch.int32)

    def run(batch: int, context: int, block_n: int = 64) -> tuple[float, float, int]:
        per_seq = context // bs
        tables = perm[: batch * per_seq].view(batch, per_seq)
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        starts = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, heads, head_dim, dtype=dtype, device="cuda")
        out = torch.empty_like(q)
        splits = choose_num_splits(batch, kv_heads, context, block_n, num_sms)
        plan = plan_attention([1] * batch, heads // kv_heads, "cuda", num_splits=splits, block_n=block_n)
        ms = time_ms(lambda: paged_attention(q, k_cache, v_cache, tables, lens, starts, head_dim ** -0.5, plan, out),
                     iters=20 if batch * context <= 1 << 20 else 5)
        moved = 2 * batch * context * kv_heads * head_dim * 2 + 2 * q.numel() * 2
        return ms, moved / ms / 1e6, splits

    say(f"peak HBM {peak:.0f} GB/s; {torch.cuda.get_device_name()}, {num_sms} SMs; bf16, 32 q / 8 kv heads x 128")
    say(f"{'batch':>6} {'context':>8} {'splits':>6} {'ms':>9} {'GB/s':>8} {'% peak':>7}")
    for batch in batches:
        for context in contexts:
            ms, gbs, splits = run(batch, context)
            say(f"{batch:>6} {context:>8} {splits:>6} {ms:>9.4f} {gbs:>8.0f} {100 * gbs / peak:>6.1f}%")
            if batch == 64 and context == 4096:
                SUMMARY.append(f"decode attention 64 x 4k: {gbs:.0f} GB/s = {100 * gbs / peak:.1f}% of peak (goal 70%)")
    say("tile sweep at batch 64 x 4k (BLOCK_N: GB/s):",
        ", ".join(f"{n}: {run(64, 4096, n)[1]:.0f}" for n in (16, 32, 64, 128)))


# -- 3. the 8B-shaped model ------------------------------------------------------------


def llama8b_config():
    from engine.model_config import ModelConfig

    return ModelConfig(architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                       rope_scaling=dict(LLAMA3_ROPE), eos_token_ids=(128001,))


def random_weights(config, dtype=torch.bfloat16, device="cuda", seed=0):
    """Canonical fused weights drawn directly on the GPU (no host copy, no download)."""
    from backends.torch_model.weights import LayerWeights, ModelWeights

    g = torch.Generator(device=device).manual_seed(seed)
    h, hkv, d, hid, inter = (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                             config.hidden_size, config.intermediate_size)

    def w(*shape):
        return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)

    layers = [LayerWeights(input_norm=torch.ones(hid, dtype=dtype, device=device), qkv=w((h + 2 * hkv) * d, hid),
                           qkv_bias=None, o_proj=w(hid, h * d), post_norm=torch.ones(hid, dtype=dtype, device=device),
                           gate_up=w(2 * inter, hid), down=w(hid, inter))
              for _ in range(config.num_hidden_layers)]
    return ModelWeights(embed=w(config.vocab_size, hid), layers=layers,
                        final_norm=torch.ones(hid, dtype=dtype, device=device), lm_head=w(config.vocab_size, hid))


def workload(num_requests: int, low: int, high: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, vocab, int(rng.integers(low, high + 1))).tolist(), int(rng.integers(low, high + 1)))
            for _ in range(num_requests)]


def run_offline(backend, requests, num_blocks: int, block_size: int, max_num_seqs: int,
                max_num_batched_tokens: int) -> dict:
    """Scheduler + backend loop (the engine's step without detokenization); greedy, fixed output lengths."""
    from engine.sampling_params import SamplingParams
    from scheduler.request import Request, RequestStatus
    from scheduler.scheduler import Scheduler, SchedulerConfig

    scheduler = Scheduler(SchedulerConfig(num_kv_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                                          max_num_batched_tokens=max_num_batched_tokens, max_model_len=4096))
    wanted = {}
    for i, (prompt, out_len) in enumerate(requests):
        params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
        scheduler.add_request(Request(f"r{i}", prompt, params, block_size))
        wanted[f"r{i}"] = out_len
    decode_times, steps = [], 0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    while scheduler.has_unfinished_requests():
        sched = scheduler.schedule()
        t_step = time.perf_counter()
        result = backend.execute(sched)
        if sched.scheduled and all(len(r.token_ids) == 1 for r in sched.scheduled):
            decode_times.append((len(sched.scheduled), time.perf_counter() - t_step))
        steps += 1
        for request in scheduler.update_from_output(sched, result):
            if len(request.output_token_ids) >= wanted[request.request_id]:
                scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_LENGTH)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "output_tokens": sum(wanted.values()), "steps": steps, "decode_times": decode_times,
            "preemptions": scheduler.num_preemptions}


def model_8b(quick: bool, results: dict) -> None:
    from backends.cuda.backend import CUDABackend

    config = llama8b_config()
    t0 = time.perf_counter()
    weights = random_weights(config)
    torch.cuda.synchronize()
    say(f"random bf16 Llama-3.1-8B-shaped weights on the GPU in {time.perf_counter() - t0:.1f} s")
    num_requests, low, high = (64, 100, 256) if quick else (256, 100, 1024)
    requests = workload(num_requests, low, high, config.vocab_size)
    results["requests"] = requests
    block_size, max_num_seqs, max_tokens = 16, 256, 2048
    for mode in ("none", "piecewise", "full"):
        say(f"\n-- cuda_graph_mode={mode}")
        backend = CUDABackend(config, weights, dtype="bfloat16", cuda_graph_mode=mode, gpu_memory_utilization=0.9,
                              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens, max_model_len=4096)
        try:
            t0 = time.perf_counter()
            kv_bytes = backend.profile_kv_cache_memory(block_size)
            num_blocks = backend.num_blocks_for_memory(kv_bytes, block_size)
            backend.allocate_kv_cache(num_blocks, block_size)
            say(f"KV cache: {kv_bytes / 2**30:.1f} GiB = {num_blocks} blocks of {block_size} "
                f"({num_blocks * block_size} tokens); profile + allocate + capture {time.perf_counter() - t0:.1f} s")
            stats = backend.capture_stats
            if stats is not None:
                say(f"captured {stats.num_graphs} graphs over {len(stats.per_size_seconds)} sizes in "
                    f"{stats.seconds:.2f} s, {stats.memory_bytes / 2**20:.0f} MiB")
                say("per size (s): " + ", ".join(f"{k}: {v:.3f}" for k, v in sorted(stats.per_size_seconds.items())))
            for batch in (1, 8):
                small = workload(batch, 128, 128, config.vocab_size, seed=batch)
                small = [(p, 64) for p, _ in small]
                run = run_offline(backend, small, num_blocks, block_size, max_num_seqs, max_tokens)
                ms = 1000 * float(np.median([t for _, t in run["decode_times"]]))
                results[(mode, batch)] = ms
                say(f"decode step at batch {batch}: {ms:.2f} ms (median of {len(run['decode_times'])})")
            run = run_offline(backend, requests, num_blocks, block_size, max_num_seqs, max_tokens)
            tps = run["output_tokens"] / run["seconds"]
            results[mode] = tps
            say(f"offline: {num_requests} requests, in/out uniform [{low}, {high}]: {run['output_tokens']} output "
                f"tokens in {run['seconds']:.1f} s = {tps:.0f} tok/s ({run['steps']} steps, "
                f"{run['preemptions']} preemptions)")
            SUMMARY.append(f"8B offline {mode}: {tps:.0f} output tok/s")
        finally:
            backend.shutdown()
            del backend
            torch.cuda.empty_cache()
    for batch in (1, 8):
        if ("none", batch) in results and ("full", batch) in results:
            ratio = results[("none", batch)] / results[("full", batch)]
            say(f"decode batch {batch}: full graphs {ratio:.2f}x faster than none (goal 1.5x)")
            SUMMARY.append(f"decode batch {batch}: full {ratio:.2f}x vs none")
    del weights


# -- 4. HF transformers baseline --------------------------------------------------------


def hf_baseline(quick: bool, results: dict) -> None:
    import transformers

    config = llama8b_config()
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=False)
    rope = {**LLAMA3_ROPE, "rope_theta": config.rope_theta}
    if hasattr(hf_config, "rope_parameters"):
        hf_config.rope_parameters = rope
    else:
        hf_config.rope_theta, hf_config.rope_scaling = config.rope_theta, dict(LLAMA3_ROPE)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    requests = results.get("requests") or workload(64 if quick else 256, 100, 256 if quick else 1024,
                                                   config.vocab_size)
    num = 16 if quick else 64
    subset, batch_size = requests[:num], 64
    useful, t0 = 0, time.perf_counter()
    for start in range(0, len(subset), batch_size):
        batch = subset[start:start + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.int64)
        mask = torch.zeros((len(batch), width), dtype=torch.int64)
        for i, (p, _) in enumerate(batch):                                     # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        new = max(o for _, o in batch)
        with torch.inference_mode():
            model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
        useful += sum(o for _, o in batch)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tps = useful / seconds
    say(f"HF generate(): first {len(subset)} requests of the workload, static batches of {batch_size}: "
        f"{useful} requested output tokens in {seconds:.1f} s = {tps:.0f} tok/s")
    for mode in ("none", "piecewise", "full"):
        if mode in results:
            say(f"pagedgen {mode}: {results[mode]:.0f} tok/s = {results[mode] / tps:.1f}x HF (goal 10x)")
            SUMMARY.append(f"8B {mode} vs HF: {results[mode] / tps:.1f}x")
    del model


# -- 5. greedy parity on the default model ------------------------------------------------


def parity(quick: bool) -> None:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "Paged attention stores the KV cache in",
               "Once upon a time"]
    params = SamplingParams(temperature=0.0, max_tokens=16 if quick else 48)

    def tokens(**options) -> list[list[int]]:
        llm = LLM(None, num_kv_blocks=512, **options)
        try:
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        finally:
            llm.engine.backend.shutdown()

    from backends.base import resolve_backend_name

    say(f"backend='auto' resolves to {resolve_backend_name('auto')!r} here")
    reference = tokens(backend="cpu", dtype="float32")
    for dtype, mode in (("float32", "full"), ("float32", "piecewise"), ("bfloat16", "full")):
        got = tokens(backend="cuda", dtype=dtype, cuda_graph_mode=mode)
        same = sum(a == b for a, b in zip(got, reference))
        firsts = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(got, reference)]
        say(f"cuda {dtype} {mode}: {same}/{len(prompts)} greedy completions identical to cpu float32; "
            f"first divergence per prompt: {firsts}")
        SUMMARY.append(f"parity cuda {dtype} {mode}: {same}/{len(prompts)} identical")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes and workloads (about 2 minutes)")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["tests", "bandwidth", "model", "hf", "parity"], help="skip a section (repeatable)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        say("no CUDA device: nothing to check")
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    t0 = time.perf_counter()
    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, quick={args.quick}")
    results: dict = {}
    if "tests" not in args.skip:
        section("kernel tests (native)", kernel_tests, args.quick)
    if "bandwidth" not in args.skip:
        section("paged decode attention bandwidth", attention_bandwidth, args.quick)
    if "model" not in args.skip:
        section("Llama-3.1-8B-shaped model: graphs and throughput", model_8b, args.quick, results)
    if "hf" not in args.skip:
        section("HF transformers generate() baseline", hf_baseline, args.quick, results)
    if "parity" not in args.skip:
        section("greedy parity with the cpu backend (default model)", parity, args.quick)
    say(f"\n=== summary ({time.perf_counter() - t0:.0f} s) ===")
    for line in SUMMARY:
        say(line)
    return 0 if not any("FAILED" in line for line in SUMMARY) else 1


if __name__ == "__main__":
    sys.exit(main())
