"""``bench offline --latency`` on the tiny model: TTFT, TPOT and a decode-step breakdown that adds up."""

from __future__ import annotations

import importlib.util
import json

import pytest

from bench.step_timers import OVERHEAD_PARTS, breakdown
from cli.main import main


def run_latency(model_dir, tmp_path, backend: str, *extra: str) -> dict:
    out = tmp_path / f"latency-{backend}.json"
    rc = main(["bench", "offline", "--model", model_dir, "--backend", backend, "--num-kv-blocks", "64",
               "--num-threads", "1", "--latency", "--output", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())["latency"]


def check_breakdown(r: dict, parts: set[str]) -> None:
    assert set(r["breakdown_ms"]) == parts == set(r["shares"])
    assert all(v >= 0 for v in r["breakdown_ms"].values())
    assert sum(r["breakdown_ms"].values()) == pytest.approx(r["decode_step_ms"], rel=1e-6)
    assert sum(r["shares"].values()) == pytest.approx(1.0, abs=1e-6)
    assert r["breakdown_ms"]["matmul"] > 0 and r["breakdown_ms"]["engine"] > 0
    assert 0 < r["not_matmul_share"] < 1
    assert r["not_matmul_share"] == pytest.approx(1 - r["shares"]["matmul"] - r["shares"].get("fused_layer", 0.0))
    assert 0 < r["overhead_ms"] < r["decode_step_ms"]
    assert r["overhead_ms"] == pytest.approx(sum(r["breakdown_ms"][k] for k in OVERHEAD_PARTS if k in parts))


def check_times(r: dict, prompt: int, output: int) -> None:
    assert (r["prompt_tokens"], r["output_tokens"]) == (prompt, output)
    assert r["decode_steps"] == output - 1 and r["prefill_steps"] >= 1
    assert 0 < r["ttft_ms"] < r["e2e_s"] * 1000
    assert r["tpot_mean_ms"] > 0 and r["tpot_median_ms"] > 0 and r["decode_step_cpu_ms"] > 0
    assert r["tpot_mean_ms"] == pytest.approx((r["e2e_s"] * 1000 - r["ttft_ms"]) / (output - 1))
    assert r["output_tokens_per_s"] == pytest.approx(output / r["e2e_s"])


def test_cpu_latency_defaults_to_128_plus_128(tiny_model_dir, tmp_path, capsys):
    r = run_latency(tiny_model_dir, tmp_path, "cpu", "--profile-ops", "3")
    check_times(r, 128, 128)
    check_breakdown(r, {"matmul", "fused_layer", "attention", "model_other", "prepare", "sampler", "backend_other",
                        "engine"})
    assert r["matmul_estimated"] is False
    if r["native_attention_ms"] is not None:                 # the native kernel is part of attention
        assert 0 < r["native_attention_ms"] <= r["breakdown_ms"]["attention"]
    out = capsys.readouterr().out
    assert "TTFT" in out and "TPOT mean" in out and "not-matmul share of a decode step" in out
    assert "Python/dispatch overhead (cpu, batch 1)" in out
    assert "aten::" in r["profile_ops"] and "Self CPU" in r["profile_ops"]      # the operator table


@pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="needs mlx")
def test_metal_latency_with_lengths(tiny_model_dir, tmp_path, capsys):
    r = run_latency(tiny_model_dir, tmp_path, "metal", "--input-len", "20:20", "--output-len", "6:6")
    check_times(r, 20, 6)
    check_breakdown(r, {"matmul", "eval_other", "graph_build", "sampler", "backend_other", "engine"})
    assert r["matmul_estimated"] is True and r["native_attention_ms"] is None
    assert "MLX: matmul estimated" in capsys.readouterr().out


def test_breakdown_parts_sum_to_the_step():
    totals = {"execute": 0.008, "compute_logits": 0.006, "forward": 0.005, "matmul": 0.002, "fused_layer": 0.001,
              "attention": 0.001, "sampler": 0.001}
    parts = breakdown("cpu", totals, 0.010)
    assert parts == pytest.approx({"matmul": 0.002, "fused_layer": 0.001, "attention": 0.001, "model_other": 0.001,
                                   "prepare": 0.001,
                                   "sampler": 0.001, "backend_other": 0.001, "engine": 0.002})
    mlx = breakdown("metal", {"execute": 0.008, "compute_logits": 0.007, "forward": 0.001, "sampler": 0.001},
                    0.010, mlx_matmul_s=0.009)
    assert mlx["matmul"] == pytest.approx(0.006) and mlx["eval_other"] == 0.0   # an estimate above the eval is capped
    assert mlx["graph_build"] == 0.001
    assert sum(mlx.values()) == pytest.approx(0.010)
