"""``pagedgen bench offline``: the engine without the service, optionally vs. HF.

The default workload is the engine-core figure: 64 requests, prompts of
32-256 random tokens, 32-128 output tokens, EOS ignored, greedy, seed 0.
Every request of a turn is added at once; its TTFT, ITL and latency are
taken at the steps that produced its tokens (``bench.report`` figures).
A multi-turn workload runs turn by turn, each turn resending the history.

After the workload, the run's matmul FLOPs are set against a short GEMM
calibration of this machine (``bench.ceiling``: the fraction of the ceiling
reached; ``--no-ceiling`` skips it). ``--latency`` runs one request alone
instead and breaks its decode step down (``bench.latency``).
"""

from __future__ import annotations

import time
from dataclasses import replace

from bench import latency
from bench.ceiling import MatmulFlops, calibrate_gemm, ceiling_report, format_ceiling, run_flops
from bench.datasets import BenchRequest, Conversation, add_dataset_args, dataset_config, take
from bench.launch import add_engine_args
from bench.report import RequestRecord, format_table, plot, records_json, summarize, write_json
from engine.args import EngineArgs
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def run_engine(engine: LLMEngine, requests: list[BenchRequest], generated: dict | None = None) -> dict:
    """Run all requests at once through the step loop; returns figures and
    per-request records (``"records"``).

    ``generated``, when given, receives each request's output token ids by index.
    """
    kv = engine.scheduler.kv
    bs = engine.scheduler.config.block_size
    queries0, hits0, preempt0 = kv.prefix_cache_queries, kv.prefix_cache_hits, engine.scheduler.num_preemptions
    t0 = time.perf_counter()
    for i, r in enumerate(requests):
        engine.add_request(f"bench-{i}", **r.inputs(), sampling_params=SamplingParams(
            temperature=0.0, max_tokens=r.max_tokens, ignore_eos=r.ignore_eos))
    records = [RequestRecord(ok=False) for _ in requests]
    last_token_at: dict[int, float] = {}
    steps = 0
    best_util = 0.0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        steps += 1
        running = engine.scheduler.running
        if running:
            stored = sum(r.num_computed_tokens for r in running)
            slots = sum(len(kv.get_block_ids(r.request_id)) for r in running) * bs
            best_util = max(best_util, stored / slots) if slots else best_util
        now = time.perf_counter() - t0
        for out in outputs:
            i = int(out.request_id.split("-")[1])
            rec = records[i]
            ids = [t for c in out.outputs for t in c.token_ids]
            if ids:
                if i not in last_token_at:
                    rec.ttft_s = now
                else:
                    rec.itls_s.append(now - last_token_at[i])
                last_token_at[i] = now
                rec.output_tokens += len(ids)
            if out.finished:
                rec.ok, rec.latency_s = True, now
                rec.prompt_tokens, rec.cached_prompt_tokens = len(out.prompt_token_ids), out.num_cached_tokens
            if generated is not None:
                generated.setdefault(i, []).extend(ids)
    elapsed = time.perf_counter() - t0
    prompt_tokens = sum(r.prompt_tokens for r in records)
    out_tokens = sum(r.output_tokens for r in records)
    hits = kv.prefix_cache_hits - hits0
    ttfts = sorted(r.ttft_s for r in records if r.ttft_s is not None)
    return {
        "elapsed_s": elapsed, "steps": steps, "requests": len(requests),
        "output_tokens": out_tokens, "prompt_tokens": prompt_tokens,
        "output_tokens_per_s": out_tokens / elapsed, "total_tokens_per_s": (out_tokens + prompt_tokens) / elapsed,
        "requests_per_s": len(requests) / elapsed,
        "prompt_tokens_computed": prompt_tokens - hits, "prefix_cache_hit_tokens": hits,
        "prefix_cache_queries": kv.prefix_cache_queries - queries0,
        "median_ttft_s": ttfts[len(ttfts) // 2] if ttfts else None,
        "max_kv_utilization": best_util, "num_preemptions": engine.scheduler.num_preemptions - preempt0,
        "records": records,
    }


def run_workload(engine: LLMEngine, convs: list[Conversation]) -> dict:
    """Turn by turn, every conversation's turn at once; replies join the history."""
    histories: list[list[int]] = [[] for _ in convs]
    totals: dict = {"elapsed_s": 0.0, "output_tokens": 0, "prompt_tokens": 0, "prompt_tokens_computed": 0,
                    "prefix_cache_hit_tokens": 0, "prefix_cache_queries": 0, "requests": 0, "steps": 0,
                    "num_preemptions": 0, "max_kv_utilization": 0.0}
    records: list[RequestRecord] = []
    for turn in range(max(len(c.turns) for c in convs)):
        active = [i for i, c in enumerate(convs) if turn < len(c.turns)]
        batch = [convs[i].request(turn, histories[i]) for i in active]
        replies: dict[int, list[int]] = {}
        r = run_engine(engine, batch, replies)
        for k in ("elapsed_s", "output_tokens", "prompt_tokens", "prompt_tokens_computed", "prefix_cache_hit_tokens",
                  "prefix_cache_queries", "requests", "steps", "num_preemptions"):
            totals[k] += r[k]
        totals["max_kv_utilization"] = max(totals["max_kv_utilization"], r["max_kv_utilization"])
        records.extend(r["records"])
        for j, i in enumerate(active):
            if convs[i].resend_history:
                histories[i] = batch[j].prompt_token_ids + replies.get(j, [])
    e = totals["elapsed_s"]
    ttfts = sorted(r.ttft_s for r in records if r.ttft_s is not None)
    totals.update(output_tokens_per_s=totals["output_tokens"] / e, requests_per_s=totals["requests"] / e,
                  total_tokens_per_s=(totals["output_tokens"] + totals["prompt_tokens"]) / e,
                  prefix_cache_hit_rate=totals["prefix_cache_hit_tokens"] / max(1, totals["prompt_tokens"]),
                  median_ttft_s=ttfts[len(ttfts) // 2] if ttfts else None, records=records)
    return totals


def tokenized(engine: LLMEngine, convs: list[Conversation]) -> list[Conversation]:
    """Text and chat prompts (jsonl) as token ids, so timing and the HF baseline see ids."""
    def ids(r: BenchRequest) -> BenchRequest:
        if r.prompt_token_ids is not None:
            return r
        return BenchRequest(engine.tokenize_input(prompt=r.prompt, messages=r.messages), r.max_tokens,
                            ignore_eos=r.ignore_eos)
    return [Conversation([ids(r) for r in c.turns], c.resend_history) for c in convs]


def engine_args(args) -> EngineArgs:
    """The engine options of a bench command line (``bench.launch.add_engine_args``; the dataset's ``--seed``)."""
    return EngineArgs.from_cli_args(args)


def prepare(engine: LLMEngine, cfg, convs: list[Conversation], *, warmup: bool) -> None:
    """What a long-running server would have done before the workload: a tiny
    warm-up request (whose blocks are then dropped from the prefix cache, so
    the workload gets no hit from it) and, for shared-prefix, the prefix in
    the cache."""
    first = convs[0].turns[0]
    if warmup:
        run_engine(engine, [BenchRequest(first.prompt_token_ids[:16], 4)])
        engine.scheduler.kv.reset_prefix_cache()
    if cfg.name == "shared-prefix":
        run_engine(engine, [replace(first, max_tokens=1)])


def main(args) -> int:
    cfg = dataset_config(args)
    if args.compare == "hf" and cfg.name == "multi-turn":
        raise ValueError("--compare hf needs a single-turn dataset (random, shared-prefix or jsonl)")
    t0 = time.perf_counter()
    engine = LLMEngine(engine_args(args))
    load_s = time.perf_counter() - t0
    try:
        return _run(engine, args, cfg, load_s)
    finally:
        engine.shutdown()


def _run(engine: LLMEngine, args, cfg, load_s: float) -> int:
    tok = engine.tokenizer
    report: dict = {"benchmark": "offline", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "config": {k: v for k, v in vars(args).items() if k != "func"}, "load_s": load_s}
    if args.latency:
        latency.main(engine, args, cfg, report)
        if args.output:
            write_json(args.output, report)
        return 0
    convs = tokenized(engine, take(cfg, args.num_requests, engine.model_config.vocab_size, tok.all_special_ids))
    prepare(engine, cfg, convs, warmup=args.warmup)
    result = run_workload(engine, convs)
    records = result.pop("records")
    summary = summarize(records, result["elapsed_s"])
    report["pagedgen"] = {**result, **summary}
    if args.save_requests:
        report["pagedgen"]["requests"] = records_json(records)
    print_row("pagedgen", result)
    if args.ceiling:
        report["ceiling"] = ceiling(engine, records, result["elapsed_s"], args.calibration_s)
        print(format_ceiling(report["ceiling"]))

    baselines = {}
    if args.compare == "hf":
        import torch

        from bench.hf_baseline import hf_baseline_model, run_hf
        from engine.model_loader import load_model

        loaded = load_model(args.model)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[engine.dtype]
        model = hf_baseline_model(loaded, torch_dtype)
        pad = tok.hf.pad_token_id if tok.hf.pad_token_id is not None else tok.eos_token_ids[0]
        report["hf"] = run_hf(model, [c.turns[0] for c in convs], args.hf_batch_size, pad)
        print_row("hf", report["hf"])
        ratio = report["pagedgen"]["output_tokens_per_s"] / report["hf"]["output_tokens_per_s"]
        report["speedup_vs_hf"] = ratio
        baselines[f"HF generate(), batch {args.hf_batch_size}"] = report["hf"]["output_tokens_per_s"]
        print(f"speedup (output tokens/s, pagedgen / hf static batch {args.hf_batch_size}): {ratio:.2f}x")
    title = f"pagedgen bench offline: {engine.model.name} ({engine.backend_name}), dataset {cfg.name}"
    print(format_table(title, ["pagedgen"], [summary]))
    if args.output:
        write_json(args.output, report)
    if args.plot:
        plot(args.plot, title, ["pagedgen"], [summary], [records], baselines)
    return 0


def ceiling(engine: LLMEngine, records: list[RequestRecord], elapsed_s: float, seconds: float = 1.5) -> dict:
    """The run's matmul FLOPs, this machine's GEMM rate at the model's prefill shapes, and the fraction reached."""
    flops = run_flops(MatmulFlops.of(engine.model_config),
                      [(r.prompt_tokens, r.cached_prompt_tokens, r.output_tokens) for r in records if r.ok])
    device = "cuda" if engine.backend_name == "cuda" else "cpu"
    dtype = engine.dtype if device == "cuda" else "float32"
    gemm = calibrate_gemm(engine.model_config, rows=min(2048, engine.args.max_num_batched_tokens),
                          seconds=seconds, dtype=dtype, device=device)
    return ceiling_report(flops, gemm, elapsed_s)


def print_row(name: str, r: dict) -> None:
    extra = ""
    if "max_kv_utilization" in r:
        extra = (f"  max KV util {r['max_kv_utilization']:.1%}  prompt tokens computed "
                 f"{r['prompt_tokens_computed']}/{r['prompt_tokens']}  median TTFT {r['median_ttft_s']:.3f}s")
    print(f"{name:>9}: {r['output_tokens']} output tokens in {r['elapsed_s']:.2f}s = "
          f"{r['output_tokens_per_s']:.1f} tok/s, {r['requests_per_s']:.2f} req/s{extra}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("offline", help="benchmark the engine without the service",
                              description="Run a workload through the offline engine; "
                                          "--compare hf adds Hugging Face transformers generate() in the same run.")
    p.add_argument("--num-requests", type=int, default=64, help="requests (multi-turn: conversations)")
    add_dataset_args(p)
    g = p.add_argument_group("engine")
    add_engine_args(g)
    g.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the tiny warm-up request")
    m = p.add_argument_group("modes")
    m.add_argument("--latency", action="store_true",
                   help="one request alone (128 prompt + 128 output tokens unless --input-len/--output-len are "
                        "given): TTFT, TPOT and where a decode step's time goes (matmul share, overhead)")
    m.add_argument("--profile-ops", type=int, default=0, metavar="STEPS",
                   help="with --latency: also profile this many decode steps with torch.profiler (cpu) and "
                        "print the operators with the most self time")
    m.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                   help="skip the matmul-FLOPs ceiling (a short GEMM calibration after the workload)")
    m.add_argument("--calibration-s", type=float, default=1.5,
                   help="seconds of the GEMM calibration at the model's prefill shapes")
    o = p.add_argument_group("baseline and report")
    o.add_argument("--compare", choices=("hf",), default=None, help="also run HF transformers generate()")
    o.add_argument("--hf-batch-size", type=int, default=16, help="static batch size of the HF baseline")
    o.add_argument("--output", default=None, help="write every figure and the configuration as JSON")
    o.add_argument("--save-requests", action="store_true", help="also put every request's record in the JSON")
    o.add_argument("--plot", default=None, help="write latency distributions (PNG)")
    p.set_defaults(func=main)
