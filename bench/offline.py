"""``pagedgen bench offline``: the engine without the service, optionally vs. HF.

The default workload is the engine-core figure: 64 requests, prompts of
32-256 random tokens, 32-128 output tokens, EOS ignored, greedy, seed 0.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

from bench.workload import BenchRequest, allowed_token_ids, parse_range, random_workload, shared_prefix_workload
from engine.args import EngineArgs
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def run_engine(engine: LLMEngine, requests: list[BenchRequest], generated: dict | None = None) -> dict:
    """Run all requests at once through the step loop; returns figures.

    ``generated``, when given, receives each request's output token ids by index.
    """
    kv = engine.scheduler.kv
    bs = engine.scheduler.config.block_size
    queries0, hits0 = kv.prefix_cache_queries, kv.prefix_cache_hits
    t0 = time.perf_counter()
    for i, r in enumerate(requests):
        engine.add_request(f"bench-{i}", prompt_token_ids=r.prompt_token_ids,
                           sampling_params=SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True))
    ttft: dict[str, float] = {}
    out_tokens = steps = 0
    best_util = 0.0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        steps += 1
        running = engine.scheduler.running
        if running:
            stored = sum(r.num_computed_tokens for r in running)
            slots = sum(len(kv.get_block_ids(r.request_id)) for r in running) * bs
            best_util = max(best_util, stored / slots) if slots else best_util
        now = time.perf_counter()
        for out in outputs:
            n = sum(len(c.token_ids) for c in out.outputs)
            if n and out.request_id not in ttft:
                ttft[out.request_id] = now - t0
            out_tokens += n
            if generated is not None:
                generated.setdefault(int(out.request_id.split("-")[1]), []).extend(
                    t for c in out.outputs for t in c.token_ids)
    elapsed = time.perf_counter() - t0
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    hits = kv.prefix_cache_hits - hits0
    ttfts = sorted(ttft.values())
    return {
        "elapsed_s": elapsed, "steps": steps, "requests": len(requests),
        "output_tokens": out_tokens, "prompt_tokens": prompt_tokens,
        "output_tokens_per_s": out_tokens / elapsed, "total_tokens_per_s": (out_tokens + prompt_tokens) / elapsed,
        "requests_per_s": len(requests) / elapsed,
        "prompt_tokens_computed": prompt_tokens - hits, "prefix_cache_hit_tokens": hits,
        "prefix_cache_queries": kv.prefix_cache_queries - queries0,
        "median_ttft_s": ttfts[len(ttfts) // 2] if ttfts else None,
        "max_kv_utilization": best_util, "num_preemptions": engine.scheduler.num_preemptions,
    }


def build_workload(args, vocab_size: int, special_ids: frozenset[int]) -> list[BenchRequest]:
    if args.dataset == "shared-prefix":
        return shared_prefix_workload(args.num_requests, args.prefix_len, args.suffix_len,
                                      parse_range(args.output_len)[0], vocab_size, args.seed, special_ids)
    return random_workload(args.num_requests, parse_range(args.input_len), parse_range(args.output_len),
                           vocab_size, args.seed, special_ids)


def main(args) -> int:
    engine_args = EngineArgs(model=args.model, backend=args.backend, dtype=args.dtype,
                             max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                             kv_cache_memory=args.kv_cache_memory, num_kv_blocks=args.num_kv_blocks,
                             enable_prefix_caching=not args.no_enable_prefix_caching, seed=args.seed,
                             num_threads=args.num_threads)
    t0 = time.perf_counter()
    engine = LLMEngine(engine_args)
    load_s = time.perf_counter() - t0
    tok = engine.tokenizer
    requests = build_workload(args, engine.model_config.vocab_size, frozenset(tok.all_special_ids))
    report: dict = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "load_s": load_s}

    if args.dataset == "multi-turn":
        report["pagedgen"] = run_multi_turn(engine, args, frozenset(tok.all_special_ids))
        print_row("pagedgen", report["pagedgen"])
        return _finish(engine, args, report)
    if args.dataset == "shared-prefix":
        # One warm request puts the prefix in the cache, as a long-running server would have it.
        run_engine(engine, [replace(requests[0], max_tokens=1)])
    if args.warmup:
        run_engine(engine, [BenchRequest(requests[0].prompt_token_ids[:16], 4)])
    report["pagedgen"] = run_engine(engine, requests)
    print_row("pagedgen", report["pagedgen"])

    if args.compare == "hf":
        import torch

        from bench.hf_baseline import build_hf_model, run_hf
        from engine.model_loader import load_model

        loaded = load_model(args.model)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        model = build_hf_model(loaded.config, loaded.weights, torch_dtype)
        pad = tok.hf.pad_token_id if tok.hf.pad_token_id is not None else tok.eos_token_ids[0]
        report["hf"] = run_hf(model, requests, args.hf_batch_size, pad)
        print_row("hf", report["hf"])
        ratio = report["pagedgen"]["output_tokens_per_s"] / report["hf"]["output_tokens_per_s"]
        report["speedup_vs_hf"] = ratio
        print(f"speedup (output tokens/s, pagedgen / hf static batch {args.hf_batch_size}): {ratio:.2f}x")
    return _finish(engine, args, report)


def _finish(engine: LLMEngine, args, report: dict) -> int:
    engine.shutdown()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def run_multi_turn(engine: LLMEngine, args, special_ids: frozenset[int]) -> dict:
    """Conversations that resend their whole history each turn (turn by turn, all at once)."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    allowed = allowed_token_ids(engine.model_config.vocab_size, special_ids)
    out_len = parse_range(args.output_len)[0]
    histories = [[] for _ in range(args.num_requests)]
    totals: dict = {"elapsed_s": 0.0, "output_tokens": 0, "prompt_tokens": 0, "prompt_tokens_computed": 0,
                    "prefix_cache_hit_tokens": 0, "requests": 0, "steps": 0, "max_kv_utilization": 0.0}
    ttfts = []
    for _ in range(args.turns):
        for h in histories:
            h.extend(rng.choice(allowed, args.suffix_len).tolist())
        turn = [BenchRequest(list(h), out_len) for h in histories]
        replies: dict[int, list[int]] = {}
        r = run_engine(engine, turn, replies)
        for k in ("elapsed_s", "output_tokens", "prompt_tokens", "prompt_tokens_computed",
                  "prefix_cache_hit_tokens", "requests", "steps"):
            totals[k] += r[k]
        totals["max_kv_utilization"] = max(totals["max_kv_utilization"], r["max_kv_utilization"])
        ttfts.append(r["median_ttft_s"])
        for i, h in enumerate(histories):      # the reply becomes part of the history
            h.extend(replies[i])
    e = totals["elapsed_s"]
    totals.update(output_tokens_per_s=totals["output_tokens"] / e, requests_per_s=totals["requests"] / e,
                  total_tokens_per_s=(totals["output_tokens"] + totals["prompt_tokens"]) / e,
                  prefix_cache_hit_rate=totals["prefix_cache_hit_tokens"] / totals["prompt_tokens"],
                  median_ttft_s=sorted(ttfts)[len(ttfts) // 2], num_preemptions=engine.scheduler.num_preemptions)
    return totals


def print_row(name: str, r: dict) -> None:
    extra = ""
    if "max_kv_utilization" in r:
        extra = (f"  max KV util {r['max_kv_utilization']:.1%}  prompt tokens computed "
                 f"{r['prompt_tokens_computed']}/{r['prompt_tokens']}  median TTFT {r['median_ttft_s']:.3f}s")
    print(f"{name:>9}: {r['output_tokens']} output tokens in {r['elapsed_s']:.2f}s = "
          f"{r['output_tokens_per_s']:.1f} tok/s, {r['requests_per_s']:.2f} req/s{extra}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("offline", help="benchmark the engine without the service",
                              description="Run a synthetic workload through the offline engine; "
                                          "--compare hf adds Hugging Face transformers generate() in the same run.")
    p.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--backend", default="auto", help="auto|cpu|cuda|metal")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--dataset", choices=("random", "shared-prefix", "multi-turn"), default="random")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", default="32:256", help="prompt length range MIN:MAX (random dataset)")
    p.add_argument("--output-len", default="32:128", help="output length range MIN:MAX")
    p.add_argument("--prefix-len", type=int, default=1024, help="shared prefix tokens (shared-prefix)")
    p.add_argument("--suffix-len", type=int, default=32, help="distinct suffix tokens (shared-prefix) / user tokens per turn (multi-turn)")
    p.add_argument("--turns", type=int, default=4, help="turns per conversation (multi-turn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache bytes")
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--no-enable-prefix-caching", action="store_true")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the tiny warm-up request")
    p.add_argument("--compare", choices=("hf",), default=None, help="also run HF transformers generate()")
    p.add_argument("--hf-batch-size", type=int, default=16, help="static batch size of the HF baseline")
    p.add_argument("--output", default=None, help="write every figure and the configuration as JSON")
    p.set_defaults(func=main)
