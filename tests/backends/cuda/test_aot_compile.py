"""The cuda backend's Triton kernels compiled ahead of time for sm_90a (H100/H200), without a GPU.

``backends.cuda.kernels.variants`` lists the variants a model launches;
``scripts/kernel_report.py`` compiles each with the triton wheel's ptxas
(``aot.compile_variant``) and reports registers and spills. A spill fails
the test. The report runs in a subprocess: triton compiles nothing for a
GPU in a process where ``TRITON_INTERPRET=1`` was set (this directory's
conftest sets it). Split counts of 2 and more differ only in a constant
divisor, so the suite compiles 1, 2 and the largest (16); the script alone
compiles every count. Gemma 2's shape covers the soft-capped attention
forms; Mixtral's with packed layouts covers the quantized GEMM's tile
configs and the MoE grouped GEMM's block heights. A recorded run of the
backend checks that the list holds every variant it really launches (same
constexprs, warps, argument types and specialisations;
``test_cuda_quantized`` does the same for a quantized model, and checks
that warm-up launched them all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from backends.cuda.kernels.aot import parse_ptxas_log, ptxas_available, signature  # noqa: E402
from backends.cuda.kernels.launch import KernelLaunch  # noqa: E402
from backends.cuda.kernels.variants import KernelShapes, kernel_variants  # noqa: E402

from tests.backends import PagedSequence, random_tokens, step, tiny_model  # noqa: E402
from tests.backends.cuda.conftest import DEVICE  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
needs_ptxas = pytest.mark.skipif(not ptxas_available(), reason="triton without the NVIDIA backend / ptxas")
CASES = [pytest.param("llama-3.1-8b", "bfloat16", id="llama-3.1-8b-bf16"),
         pytest.param("llama-3.1-8b", "float32", id="llama-3.1-8b-fp32"),
         pytest.param("gemma-2-9b", "bfloat16", id="gemma-2-9b-bf16-softcap"),       # SOFTCAP, head_dim 256
         pytest.param("llama-3.1-8b", "float16", id="llama-3.1-8b-fp16", marks=pytest.mark.slow),
         pytest.param("smollm2-135m", "bfloat16", id="smollm2-bf16", marks=pytest.mark.slow),
         pytest.param("smollm2-135m", "float32", id="smollm2-fp32", marks=pytest.mark.slow)]


def kernel_report(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``scripts/kernel_report.py ARGS --json``; returns the process and the JSON it wrote."""
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_report.py"), *args, "--json", str(out)],
                            capture_output=True, text=True, timeout=900, cwd=ROOT,
                            env={**os.environ, "TRITON_INTERPRET": "1"})      # the script compiles regardless
    assert out.exists(), result.stdout + result.stderr
    return result, json.loads(out.read_text())


@needs_ptxas
@pytest.mark.parametrize("model, dtype", CASES)
def test_no_kernel_variant_spills_on_sm90(tmp_path, model, dtype):
    result, report = kernel_report(tmp_path, "--model", model, "--dtype", dtype, "--splits", "1,2,16", "--check")
    rows = {r["variant"]: r for r in report["variants"]}
    assert report["split_counts"] == [1, 2, 16]                                 # 16: the most on 132 SMs at 128k
    assert set(rows) == {"rms_norm", "rms_norm+residual", "rotary", "reshape_and_cache", "attention decode s1",
                         "attention decode s2", "merge_splits s2", "attention decode s16", "merge_splits s16",
                         "attention prefill"}
    assert result.returncode == 0, result.stdout
    assert not [r for r in rows.values() if r["spill_stores"] or r["spill_loads"]], result.stdout
    assert all(0 < r["registers"] <= 255 for r in rows.values()), result.stdout


# packed layouts: GGUF Q4_0/Q4_1/Q4_K (4 bits, float16 factors), Q8_0/Q5_*/Q6_K (8 bits), MLX bfloat16 checkpoints
QUANT = ["--quant", "4:32:float16", "--quant", "8:32:float16", "--quant", "4:64:bfloat16"]


@needs_ptxas
@pytest.mark.parametrize("dtype, extra", [pytest.param("bfloat16", [], id="bf16"),
                                          pytest.param("float16", ["--quant", "8:128:float32"], id="fp16",
                                                       marks=pytest.mark.slow)])
def test_quantized_gemm_and_moe_variants_do_not_spill_on_sm90(tmp_path, dtype, extra):
    result, report = kernel_report(tmp_path, "--model", "mixtral-8x7b", "--dtype", dtype, *QUANT, *extra,
                                   "--kernel", "qmm", "--kernel", "moe", "--check")
    rows = {r["variant"]: r for r in report["variants"]}
    layouts = ["w4g32 fp16", "w8g32 fp16", "w4g64 bf16"] + (["w8g128 fp32"] if extra else [])
    # Mixtral's expert gate_up and down specialise alike (sizes all multiples of 16): one form per height
    assert set(rows) == {f"qmm {q} {c}" for q in layouts for c in ("decode", "small", "prefill")} | {
        "moe m16 gate_up", "moe m64 gate_up"}
    assert result.returncode == 0, result.stdout
    assert not [r for r in rows.values() if r["spill_stores"] or r["spill_loads"]], result.stdout
    assert all(0 < r["registers"] <= 255 for r in rows.values()), result.stdout


@needs_ptxas
def test_kernel_report_prints_registers_and_spills_per_variant(tmp_path):
    result, report = kernel_report(tmp_path, "--model", "tiny", "--dtype", "float16", "--kernel", "rms_norm", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tiny" in result.stdout and "rms_norm+residual" in result.stdout and "2 variants, 0 spill" in result.stdout
    rows = report["variants"]
    assert [r["variant"] for r in rows] == ["rms_norm", "rms_norm+residual"]
    assert all(r["registers"] > 0 and r["spill_stores"] == 0 and r["num_warps"] >= 1 for r in rows)


def test_ptxas_log_parsing():
    log = ("ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
           "ptxas info    : Function properties for _k\n"
           "    536 bytes stack frame, 588 bytes spill stores, 572 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 536 bytes cumulative stack size\n")
    assert parse_ptxas_log(log) == (255, 536, 588, 572)
    with pytest.raises(RuntimeError, match="no register"):
        parse_ptxas_log("ptxas fatal   : Unsupported .version")


def launch_key(launch: KernelLaunch) -> tuple:
    """What makes a compiled variant: kernel, argument types and specialisations, constexprs, warps."""
    fn, sig, constexprs, attrs = signature(launch)
    return (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())), tuple(sorted(attrs)),
            launch.meta.get("num_warps", 4))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_variant_list_holds_every_launch_of_a_real_run(monkeypatch, dtype):
    """Warm-up plus prefill, chunked, mixed and decode steps: every launch is one of ``kernel_variants``."""
    from backends.cuda.backend import CUDABackend

    _, config, weights = tiny_model("llama", seed=3, num_attention_heads=4, num_key_value_heads=2)
    launched = set()
    run = KernelLaunch.run

    def record(self):
        launched.add(launch_key(self))
        run(self)

    monkeypatch.setattr(KernelLaunch, "run", record)
    backend = CUDABackend(config, weights, dtype=dtype, cuda_graph_mode="none", device=DEVICE,
                          max_num_batched_tokens=64, max_num_seqs=4, max_model_len=256)
    backend.allocate_kv_cache(12, 16)
    backend.warm_up()
    seqs = [PagedSequence(f"r{i}", random_tokens(n, config.vocab_size, seed=n), [2 * i, 2 * i + 1], 16)
            for i, n in enumerate((1, 20))]
    backend.execute(step([seqs[0].chunk(1), seqs[1].chunk(12)], 16))                # prefill + chunk
    for s in seqs:
        s.token_ids.append(5)
    backend.execute(step([seqs[0].chunk(1), seqs[1].chunk(9)], 16))                 # decode + rest of the chunk
    for s in seqs:
        s.token_ids.append(6)
    backend.execute(step([s.chunk(1) for s in seqs], 16))                           # decode only
    shapes = KernelShapes(config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                          config.hidden_size, getattr(torch, dtype), block_size=16, block_n=backend.attention.block_n,
                          split_counts=tuple(backend.attention.split_counts(backend.max_model_len)))
    listed = {launch_key(v.launch) for v in kernel_variants(shapes)}
    names = {key[0] for key in launched}
    assert names == {"_rms_norm_kernel", "_rotary_kernel", "_reshape_and_cache_kernel", "_paged_attention_kernel"}
    assert launched <= listed, sorted(launched - listed)
