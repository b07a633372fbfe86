"""``pagedgen bench host-overhead``: the host's share of a step without the model.

What a step costs the host at a large batch, apart from the model:
``Scheduler.schedule()``, the backend's input preparation (its
``compute_logits`` up to the model call: token, position and slot tensors,
block tables and attention metadata) and ``Scheduler.update_from_output``.
The backend is a real one (cpu by default) built on a one-layer model of
random weights, so the KV cache stays small; its model's ``forward`` is
replaced by one that returns empty logits at once, so nothing but the
preparation runs, and every step of the run goes through it (a backend that
keeps a persistent batch sees every join). Sampled tokens are a fixed id;
requests ignore EOS. For a backend with a persistent input batch
(``backends.input_batch``) the block-table rows it wrote per timed step are
reported too: about ``num_requests / block_size`` (the requests whose next
token opens a block), not ``num_requests``.

Setup: ``--num-requests`` requests of ``--context-len - 1`` random prompt
tokens are prefilled (schedule, prepare, update; untimed) until all decode,
then ``--steps`` decode steps are timed part by part; medians are reported
(wall time per part, and the process CPU time of the whole step, which a
busy machine disturbs less).
Issue 16's target: schedule + prepare + update at most 1.5 ms per step at
256 requests x 4k-token contexts on the 2-core CI machine kind.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import numpy as np

from backends.base import BackendOptions
from backends.registry import create_backend
from engine.sampling_params import SamplingParams
from model.config import ModelConfig
from model.weights.canonical import expected_shapes
from scheduler.output import StepResult
from scheduler.request import Request
from scheduler.scheduler import Scheduler, SchedulerConfig

TARGET_MS = 1.5              # issue 16: schedule + prepare + update per step, 256 x 4k
SAMPLED_TOKEN = 7            # the token every sampling row "samples"


def tiny_config(vocab_size: int = 512) -> ModelConfig:
    """One llama layer with one KV head of 8 dims: a KV cache of 1 KiB per 16-token block."""
    return ModelConfig(architecture="llama", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                       max_position_embeddings=1 << 20)


def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 weights of every canonical tensor of ``config``, small random values."""
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape, dtype=np.float32) * 0.02) for name, shape in
            expected_shapes(config).items()}


def null_forward(backend_name: str, vocab_size: int):
    """A model ``forward`` that computes nothing: ``[N, V]`` logits of the backend's array type, made
    once per ``N`` and reused, so the timed preparation holds no allocation of the model's."""
    made: dict[int, object] = {}                # rows -> the logits returned for that many
    if backend_name == "metal":
        import mlx.core as mx

        def forward(input_ids, positions, kv_caches, metadata, logits_indices):
            n = logits_indices.shape[0]
            if n not in made:
                made[n] = mx.zeros((n, vocab_size), dtype=mx.float32)                      # [N, V]
                mx.eval(made[n])
            return made[n], list(kv_caches)
        return forward
    import torch

    def forward(input_ids, positions, kv_caches, metadata, logits_indices):
        n = logits_indices.shape[0]
        if n not in made:
            made[n] = torch.zeros((n, vocab_size), dtype=torch.float32)                    # [N, V]
        return made[n]
    return forward


def run(num_requests: int = 256, context_len: int = 4096, steps: int = 50, warmup_steps: int = 3,
        block_size: int = 16, backend_name: str = "cpu", seed: int = 0, profile_rows: int = 0) -> dict:
    """Median ms of schedule, prepare and update per decode step (see the module docstring).

    With ``profile_rows``, the timed steps also run under ``cProfile`` (which
    slows them) and ``"profile"`` holds its top functions by own time.
    """
    if num_requests < 1 or context_len < 2 or steps < 1 or warmup_steps < 0:
        raise ValueError("num_requests >= 1, context_len >= 2, steps >= 1 and warmup_steps >= 0 are required")
    config = tiny_config()
    prompt_len = context_len - 1
    total = context_len + warmup_steps + steps + 1
    max_model_len = total + block_size
    num_blocks = num_requests * -(-max_model_len // block_size) + 16
    budget = max(num_requests, min(prompt_len * 16, 1 << 16))           # prefill several whole prompts a step
    backend = create_backend(backend_name, config, random_weights(config), BackendOptions(
        dtype="float32", seed=seed, max_num_seqs=num_requests, max_num_batched_tokens=budget,
        max_model_len=max_model_len))
    try:
        backend.allocate_kv_cache(num_blocks, block_size)
        backend.model.forward = null_forward(backend_name, config.vocab_size)
        scheduler = Scheduler(SchedulerConfig(
            num_kv_blocks=num_blocks, block_size=block_size, max_num_seqs=num_requests,
            max_num_batched_tokens=budget, max_model_len=max_model_len))
        rng = np.random.default_rng(seed)
        params = SamplingParams(temperature=0.0, max_tokens=total, ignore_eos=True)
        for i in range(num_requests):
            ids = rng.integers(0, config.vocab_size, prompt_len).tolist()
            scheduler.add_request(Request(f"r{i}", ids, params, block_size))
        times = {"schedule": [], "prepare": [], "update": []}
        cpu_times: list[float] = []                 # process CPU seconds per timed step (less sensitive to load)
        row_writes: list[int] = []                  # block-table rows the persistent batch wrote per timed step
        batch = getattr(backend, "input_batch", None)
        setup_steps = 0
        profiler = cProfile.Profile() if profile_rows else None
        while True:
            writes_before = getattr(batch, "num_row_writes", 0)
            c0 = time.process_time()
            t0 = time.perf_counter()
            out = scheduler.schedule()
            t1 = time.perf_counter()
            backend.compute_logits(out)
            t2 = time.perf_counter()
            result = StepResult(sampled_token_ids={r.request_id: SAMPLED_TOKEN for r in out.scheduled
                                                   if r.needs_sample})
            scheduler.update_from_output(out, result)
            t3 = time.perf_counter()
            c1 = time.process_time()
            decoding = all(len(r.token_ids) == 1 for r in out.scheduled) and len(out.scheduled) == num_requests
            if not decoding:
                setup_steps += 1
                continue
            if warmup_steps:
                warmup_steps -= 1
                continue
            if profiler is not None and not times["update"]:
                profiler.enable()                   # the steps after the first timed one
            times["schedule"].append(t1 - t0)
            times["prepare"].append(t2 - t1)
            times["update"].append(t3 - t2)
            cpu_times.append(c1 - c0)
            row_writes.append(getattr(batch, "num_row_writes", 0) - writes_before)
            if len(times["update"]) == steps:
                break
    finally:
        if profiler is not None:
            profiler.disable()
        backend.shutdown()
    per_step = [a + b + c for a, b, c in zip(times["schedule"], times["prepare"], times["update"])]
    extra = {}
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(profile_rows)
        extra["profile"] = text.getvalue()
    return {**extra, "backend": backend_name, "num_requests": num_requests, "context_len": context_len,
            "block_size": block_size, "steps": steps, "setup_steps": setup_steps,
            **{f"{k}_ms": float(np.median(v)) * 1000.0 for k, v in times.items()},
            "total_ms": float(np.median(per_step)) * 1000.0, "cpu_total_ms": float(np.median(cpu_times)) * 1000.0,
            "row_writes_per_step": float(np.mean(row_writes)) if batch is not None else None,
            "target_ms": TARGET_MS}


def format_result(r: dict) -> str:
    """The figures as terminal lines."""
    return "\n".join([
        f"pagedgen bench host-overhead: {r['num_requests']} requests x {r['context_len']}-token contexts, "
        f"block size {r['block_size']}, {r['backend']} backend's input preparation, model not run",
        f"  per decode step, median of {r['steps']}: schedule {r['schedule_ms']:.2f} ms + prepare "
        f"{r['prepare_ms']:.2f} ms + update {r['update_ms']:.2f} ms = {r['total_ms']:.2f} ms "
        f"(target <= {r['target_ms']} ms: {'met' if r['total_ms'] <= r['target_ms'] else 'not met'})",
        f"  process CPU time per step, median: {r['cpu_total_ms']:.2f} ms (wall time above; on a busy machine "
        "the CPU time is the steadier figure)",
    ] + ([] if r.get("row_writes_per_step") is None else [
        f"  persistent batch: {r['row_writes_per_step']:.1f} block-table rows written per step "
        f"(of {r['num_requests']} requests)"]))


def main(args) -> int:
    from bench.report import write_json

    result = run(args.num_requests, args.context_len, args.steps, args.warmup_steps, args.block_size,
                 args.backend, args.seed, args.profile)
    print(format_result(result))
    if "profile" in result:
        print(result["profile"])
    if args.output:
        write_json(args.output, {"benchmark": "host-overhead", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime()), **result})
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("host-overhead", help="time schedule + input preparation + update per step, no model",
                              description="Host work per decode step at a large batch, without running a model "
                                          "(issue 16's target: <= 1.5 ms at 256 x 4k on 2 cores).")
    p.add_argument("--num-requests", type=int, default=256, help="running requests (the decode batch)")
    p.add_argument("--context-len", type=int, default=4096, help="tokens per request when decoding starts")
    p.add_argument("--steps", type=int, default=50, help="decode steps timed (median reported)")
    p.add_argument("--warmup-steps", type=int, default=3, help="decode steps run before timing")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--backend", choices=("cpu", "metal"), default="cpu", help="whose input preparation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="also run the timed steps under cProfile and print this many functions by own time")
    p.add_argument("--output", default=None, help="write the figures as JSON")
    p.set_defaults(func=main)
