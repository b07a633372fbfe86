"""Section (g) of the GPU check: ``pagedgen serve --backend cuda`` answering a streamed Generate."""

from __future__ import annotations

import time
from pathlib import Path

from bench.gpu_check.plan import CheckPlan
from bench.gpu_check.report import say

MAX_TOKENS = 16


def serve_and_stream(plan: CheckPlan, model_dir: Path) -> tuple[str, dict]:
    """Start the server on ``model_dir``, stream one greedy Generate through ``pagedgen_client``, stop it."""
    from pagedgen_client import Client

    from bench.launch import launch

    flags = ["--model", str(model_dir), "--backend", plan.serve_backend, "--max-model-len", "256",
             "--max-num-seqs", "8", "--max-num-batched-tokens", "256"]
    if plan.serve_backend == "cuda":
        flags += ["--dtype", "bfloat16", "--gpu-memory-utilization", "0.2"]
    else:
        flags += ["--dtype", "float32", "--num-kv-blocks", "64"]
    say("pagedgen serve " + " ".join(flags))
    server = launch(flags, timeout=plan.serve_timeout_s)
    try:
        with Client(server.address) as client:
            info = client.model_info(timeout=30)
            t0 = time.perf_counter()
            first_s, chunks = None, []
            for chunk in client.generate("The cat watches the morning light", max_tokens=MAX_TOKENS, temperature=0.0,
                                         ignore_eos=True, timeout=120):
                if first_s is None and chunk.token_ids:
                    first_s = time.perf_counter() - t0
                chunks.append(chunk)
            total_s = time.perf_counter() - t0
    finally:
        code = server.stop()
    tokens = sum(len(c.token_ids) for c in chunks)
    finish = chunks[-1].finish_reason if chunks else None
    say(f"model {info.model}: backend {info.backend}, dtype {info.dtype}, {info.num_kv_blocks} KV blocks; "
        f"{len(chunks)} chunks, {tokens} tokens, finish {finish}; server exit {code}")
    if info.backend != plan.serve_backend or tokens != MAX_TOKENS or finish != "length" or len(chunks) < 2:
        raise RuntimeError(f"unexpected stream: backend={info.backend} tokens={tokens} finish={finish} "
                           f"chunks={len(chunks)}")
    figures = {"start_to_serving_s": round(server.start_to_serving_s, 2), "chunks": len(chunks), "tokens": tokens,
               "first_token_ms": round(1000 * first_s, 1), "total_ms": round(1000 * total_s, 1),
               "backend": info.backend, "dtype": info.dtype, "num_kv_blocks": info.num_kv_blocks}
    return (f"serve --backend {info.backend} ({info.dtype}) SERVING after {server.start_to_serving_s:.1f} s; "
            f"streamed {tokens} tokens in {len(chunks)} chunks, first after {1000 * first_s:.0f} ms, "
            f"all in {1000 * total_s:.0f} ms"), figures
