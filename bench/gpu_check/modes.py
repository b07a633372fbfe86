"""Sections (d)-(f) and (h) of the GPU check, per ``cuda_graph_mode``, on the random 8B-shaped model.

Per mode, one engine (``LLMEngine`` over a ``CUDABackend`` that shares the
model's tensors): (d) its start-up (memory profile, warm-up, capture) and
the graphs' capture time; (e) logits of a prefill and teacher-forced decode
steps, driven straight through the backend before the engine runs anything,
against transformers' logits of the same tokens and against mode ``none``;
(f) offline throughput through the engine (``bench.offline.run_engine``)
against HF ``generate()`` measured once beforehand; (h) the device memory
the process uses at the end against ``gpu_memory_utilization`` x total.

Tolerances of (e): top-1 agreement >= ``TOP1_MIN[dtype]`` and max abs logit
difference <= ``MAX_ABS_DIFF[dtype]``. They are first guesses, to be set from
the first GPU run: bf16 rounds at 2^-8 relative through 32 layers, and the
top two of 128k random logits are often closer than that, so a few top-1
flips are expected in bf16 and none in float32.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench.gpu_check.models import RandomModel
from bench.gpu_check.plan import CheckPlan
from bench.gpu_check.report import say

TOP1_MIN = {"bfloat16": 0.9, "float16": 0.9, "float32": 1.0}    # (e) share of positions with the same argmax
MAX_ABS_DIFF = {"bfloat16": 0.5, "float16": 0.25, "float32": 1e-3}  # (e) max |logit difference|


@dataclass
class Workload:
    """Inputs shared by every mode."""

    parity_ids: torch.Tensor          # [R, L + S - 1] prompt then teacher-forced tokens (cpu, int64)
    hf_logits: torch.Tensor           # [R, S, V] float32 transformers logits at the positions compared
    requests: list                    # bench.datasets.BenchRequest of (f)
    hf_tokens_per_s: float | None     # (f) HF generate() output tokens per second


def prepare(plan: CheckPlan, model: RandomModel) -> Workload:
    """Random parity tokens, transformers' logits of them, the (f) requests and the HF baseline."""
    from bench.datasets import BenchRequest
    from bench.hf_baseline import run_hf

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    r, length, steps = plan.parity_requests, plan.parity_prompt_len, plan.parity_decode_steps
    ids = torch.randint(0, vocab, (r, length + steps - 1), generator=g)                      # [R, L + S - 1]
    with torch.inference_mode():
        logits = model.hf_model(ids.to(plan.device)).logits.float()                         # [R, L + S - 1, V]
    hf_logits = logits[:, length - 1:].clone()                                               # [R, S, V]
    del logits
    rng = np.random.default_rng(0)
    requests = [BenchRequest(rng.integers(0, vocab, int(rng.integers(plan.prompt_lens[0], plan.prompt_lens[1] + 1)))
                             .tolist(), int(rng.integers(plan.output_lens[0], plan.output_lens[1] + 1)))
                for _ in range(plan.num_requests)]
    hf = run_hf(model.hf_model, requests[: plan.hf_requests], plan.hf_batch_size, pad_token_id=0)
    say(f"HF generate(): {plan.hf_requests} requests in static batches of {plan.hf_batch_size}: "
        f"{hf['output_tokens']} output tokens in {hf['elapsed_s']:.1f} s = {hf['output_tokens_per_s']:.0f} tok/s")
    return Workload(ids, hf_logits, requests, hf["output_tokens_per_s"])


def start_engine(plan: CheckPlan, model: RandomModel, mode: str, weights=None):
    """``(engine, start-up seconds)``: the engine over a ``CUDABackend`` of ``mode`` on the shared tensors.

    ``weights``: a ``ModelWeights`` in place of the model's own (the 4-bit copy of (f)).
    """
    from backends.cuda.backend import CUDABackend
    from engine.args import EngineArgs
    from engine.llm_engine import LLMEngine
    from engine.model_loader import LoadedModel

    if plan.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    backend = CUDABackend(model.config, weights or model.weights, dtype=plan.dtype, cuda_graph_mode=mode,
                          gpu_memory_utilization=plan.gpu_memory_utilization, max_num_seqs=plan.max_num_seqs,
                          max_num_batched_tokens=plan.max_num_batched_tokens, max_model_len=plan.max_model_len,
                          device=plan.device)
    args = EngineArgs(model=str(model.path), backend="cuda", dtype=plan.dtype, cuda_graph_mode=mode,
                      gpu_memory_utilization=plan.gpu_memory_utilization, max_num_seqs=plan.max_num_seqs,
                      max_num_batched_tokens=plan.max_num_batched_tokens, max_model_len=plan.max_model_len,
                      num_kv_blocks=plan.num_kv_blocks)
    loaded = LoadedModel(name=model.name, path=model.path, config=model.config, weights={},
                         tokenizer=model.tokenizer, max_model_len=plan.max_model_len)
    engine = LLMEngine(args, loaded=loaded, backend=backend)
    return engine, time.perf_counter() - t0


def startup_figures(engine, seconds: float) -> tuple[str, dict]:
    """(d) Start-up and capture figures of a started engine."""
    backend = engine.backend
    stats = backend.capture_stats
    figures = {"startup_s": round(seconds, 2), "num_kv_blocks": backend.num_blocks}
    if stats is None:
        return f"start-up {seconds:.1f} s (profile + warm-up), no graphs, {backend.num_blocks} KV blocks", figures
    per_size = sorted(stats.per_size_seconds.items())
    figures.update(num_graphs=stats.num_graphs, sizes=len(per_size), capture_s=round(stats.seconds, 2),
                   graph_memory_mib=round(stats.memory_bytes / 2**20, 1),
                   per_size_s={k: round(v, 4) for k, v in per_size})
    say("capture per size (s): " + ", ".join(f"{k}: {v:.3f}" for k, v in per_size))
    return (f"{stats.num_graphs} graphs over {len(per_size)} sizes captured in {stats.seconds:.2f} s "
            f"({1000 * stats.seconds / max(1, stats.num_graphs):.1f} ms/graph, {stats.memory_bytes / 2**20:.0f} MiB); "
            f"start-up {seconds:.1f} s; {backend.num_blocks} KV blocks"), figures


def teacher_forced_logits(backend, ids: torch.Tensor, prompt_len: int, block_size: int) -> torch.Tensor:
    """Float32 logits ``[R, S, V]``: a prefill of ``ids[:, :L]``, then one decode step per further token."""
    from engine.sampling_params import SamplingParams
    from scheduler.output import ScheduledRequest, SchedulerOutput

    num_requests, total = ids.shape
    per_request = -(-(total + 1) // block_size)
    tables = [list(range(i * per_request, (i + 1) * per_request)) for i in range(num_requests)]
    params = SamplingParams(temperature=0.0)

    def chunk(i: int, start: int, stop: int) -> ScheduledRequest:
        t = tables[i]
        return ScheduledRequest(f"parity-{i}", ids[i, start:stop].tolist(), start, t,
                                [t[p // block_size] * block_size + p % block_size for p in range(start, stop)],
                                params, needs_sample=True)

    steps = [[chunk(i, 0, prompt_len) for i in range(num_requests)]]
    steps += [[chunk(i, p, p + 1) for i in range(num_requests)] for p in range(prompt_len, total)]
    rows = [backend.compute_logits(SchedulerOutput(s, block_size)).float().clone() for s in steps]   # [R, V] each
    return torch.stack(rows, dim=1)                                                               # [R, S, V]


def compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    """Top-1 agreement and max / mean abs difference of two ``[..., V]`` logit tensors."""
    diff = (got.float() - want.float()).abs()
    return {"top1": round(float((got.argmax(-1) == want.argmax(-1)).float().mean()), 4),
            "max_abs": float(f"{float(diff.max()):.4g}"), "mean_abs": float(f"{float(diff.mean()):.4g}"),
            "logit_std": round(float(want.float().std()), 4)}


def parity_figures(plan: CheckPlan, engine, work: Workload, reference: dict) -> tuple[str, dict]:
    """(e) This mode's teacher-forced logits vs transformers and vs mode ``none`` (kept in ``reference``)."""
    logits = teacher_forced_logits(engine.backend, work.parity_ids, plan.parity_prompt_len, engine.args.block_size)
    hf_logits = work.hf_logits.to(logits.device)
    figures = {"vs_hf": compare(logits, hf_logits)}
    if "none" in reference:
        figures["vs_none"] = compare(logits, reference["none"].to(logits.device))
    else:
        reference["none"] = logits.cpu()
    tol, top1 = MAX_ABS_DIFF[plan.dtype], TOP1_MIN[plan.dtype]
    ok = all(f["top1"] >= top1 and f["max_abs"] <= tol for f in figures.values())
    text = "; ".join(f"{k}: top-1 {v['top1']:.1%}, max |d| {v['max_abs']:.3g} (std {v['logit_std']:.2f})"
                     for k, v in figures.items())
    if not ok:
        raise RuntimeError(f"logits disagree beyond top-1 >= {top1:.0%}, max |d| <= {tol}: {text}")
    return f"{text}; tolerance top-1 >= {top1:.0%}, max |d| <= {tol} ({plan.dtype})", figures


def throughput_figures(plan: CheckPlan, engine, work: Workload) -> tuple[str, dict]:
    """(f) The requests through the engine; output tokens per second against HF ``generate()``."""
    from bench.offline import run_engine

    result = run_engine(engine, work.requests)
    result.pop("records", None)
    tps = result["output_tokens_per_s"]
    figures = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}
    vs = f", {tps / work.hf_tokens_per_s:.1f}x HF generate() ({work.hf_tokens_per_s:.0f} tok/s)" \
        if work.hf_tokens_per_s else ""
    figures["vs_hf"] = round(tps / work.hf_tokens_per_s, 2) if work.hf_tokens_per_s else None
    return (f"{result['requests']} requests, {result['output_tokens']} output tokens in {result['elapsed_s']:.1f} s = "
            f"{tps:.0f} tok/s{vs}; {result['steps']} steps, {result['num_preemptions']} preemptions"), figures


def quantized_throughput_figures(plan: CheckPlan, model: RandomModel, work: Workload,
                                 dense_tokens_per_s: float | None) -> tuple[str, dict]:
    """(f) The same requests with the projections and LM head in 4 bits (``quant.quantize_model``).

    Compared with ``dense_tokens_per_s``, the same mode's (f) run on the
    model's own weights (bf16 on a GPU).
    """
    from bench.gpu_check.quant import quantize_model

    t0 = time.perf_counter()
    weights = quantize_model(model.weights, 4, plan.quant_group)
    quantize_s = time.perf_counter() - t0
    packed = sum(w.nbytes for w in [weights.lm_head, *(getattr(layer, n) for layer in weights.layers
                                                       for n in ("qkv", "o_proj", "gate_up", "down"))])
    dense = sum(w.numel() * w.element_size() for w in [model.weights.lm_head, *(
        getattr(layer, n) for layer in model.weights.layers for n in ("qkv", "o_proj", "gate_up", "down"))])
    engine, startup_s = start_engine(plan, model, plan.quant_mode, weights)
    try:
        text, figures = throughput_figures(plan, engine, work)
    finally:
        stop_engine(engine)
        del weights
    tps = figures["output_tokens_per_s"]
    figures.update(quantize_s=round(quantize_s, 1), startup_s=round(startup_s, 1), packed_bytes=packed,
                   dense_bytes=dense, dense_tokens_per_s=dense_tokens_per_s,
                   vs_dense=round(tps / dense_tokens_per_s, 2) if dense_tokens_per_s else None)
    vs = f"{tps / dense_tokens_per_s:.2f}x the {plan.dtype} run ({dense_tokens_per_s:.0f} tok/s)" \
        if dense_tokens_per_s else f"no {plan.dtype} run to compare"
    return (f"W4A16 g{plan.quant_group} ({packed / 2**30:.2f} GiB of projections vs {dense / 2**30:.2f} GiB "
            f"{plan.dtype}, quantized in {quantize_s:.1f} s): {vs}; {text}"), figures


def memory_figures(plan: CheckPlan, engine) -> tuple[str, dict]:
    """(h) Device memory in use now and torch's peak, against the ``gpu_memory_utilization`` budget."""
    if plan.device != "cuda":
        return "no device memory to measure on the CPU", {}
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    used, budget = total - free, plan.gpu_memory_utilization * total
    peak = torch.cuda.max_memory_reserved()
    figures = {"used_gib": round(used / 2**30, 2), "peak_reserved_gib": round(peak / 2**30, 2),
               "budget_gib": round(budget / 2**30, 2), "total_gib": round(total / 2**30, 2),
               "kv_cache_gib": round(engine.backend.num_blocks * engine.backend.kv_block_bytes(
                   engine.args.block_size) / 2**30, 2)}
    within = used <= budget
    text = (f"device used {figures['used_gib']} GiB (torch peak reserved {figures['peak_reserved_gib']} GiB, "
            f"KV cache {figures['kv_cache_gib']} GiB) vs budget {figures['budget_gib']} GiB of "
            f"{figures['total_gib']}: {'within' if within else 'OVER'}")
    if not within:
        raise RuntimeError(text)
    return text, figures


def stop_engine(engine) -> None:
    """Release the backend's cache and graphs (the model's tensors stay for the next mode)."""
    engine.backend.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
