"""The matmul ceiling of ``bench offline``: FLOP counts from the config, the GEMM calibration, the fraction."""

from __future__ import annotations

import json

import pytest

from bench.ceiling import MatmulFlops, calibrate_gemm, ceiling_report, run_flops
from model.config import ModelConfig
from tests.bench.test_bench_offline import run_offline

SMOLLM_135M = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                          num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                          max_position_embeddings=8192)


def test_flops_of_the_default_model_shape():
    f = MatmulFlops.of(SMOLLM_135M)
    # README: 212 MFLOP per prompt token, 269 MFLOP per decoded token with the LM head.
    assert f.per_prefill_token == 30 * 2 * (576 * (576 + 2 * 192) + 576 * 576 + 3 * 576 * 1536) == 212_336_640
    assert f.per_decode_token == f.per_prefill_token + 2 * 576 * 49152
    assert round(f.per_decode_token / 1e6) == 269
    assert f.attention_per_key == 4 * 576 * 30


def test_run_flops_counts_fed_tokens_and_lm_rows():
    f = MatmulFlops(per_layer_token=10, lm_head=3, attention_per_key=1)
    r = run_flops(f, [(4, 0, 3), (5, 2, 1)])
    # request 1: 4 prompt + 2 fed outputs through the layers, 3 LM rows, keys 1+..+6
    # request 2: 3 computed prompt tokens (2 cached), none fed, 1 LM row, keys 3+4+5
    assert (r["layer_tokens"], r["lm_head_rows"]) == (9, 4)
    assert r["matmul_flops"] == 9 * 10 + 4 * 3
    assert r["attention_flops"] == 21 + 12
    with pytest.raises(ValueError):
        MatmulFlops(per_layer_token=0, lm_head=1, attention_per_key=1)


def test_calibration_and_fraction():
    gemm = calibrate_gemm(SMOLLM_135M, rows=64, seconds=0.1)
    assert gemm["gflops"] > 0 and gemm["rounds"] >= 1 and gemm["seconds"] >= 0.1
    flops = {"matmul_flops": int(gemm["gflops"] * 1e9)}          # one second's work at the calibrated rate
    c = ceiling_report(flops, gemm, elapsed_s=4.0)
    assert c["ideal_matmul_s"] == pytest.approx(1.0) and c["ceiling_fraction"] == pytest.approx(0.25)


def test_offline_reports_the_ceiling(tiny_model_dir, tmp_path, capsys):
    report = run_offline(tiny_model_dir, tmp_path, "--num-requests", "4", "--input-len", "8:20",
                         "--output-len", "3:6", "--calibration-s", "0.2")
    cfg = json.loads((tmp_path / "offline.json").read_text())["config"]
    assert cfg["ceiling"] is True
    run, c = report["pagedgen"], report["ceiling"]
    per_layer = 2 * 2 * (64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128)     # the tiny model's config.json
    lm = 2 * 64 * 400
    assert (c["flops_per_prefill_token"], c["flops_per_decode_token"]) == (per_layer, per_layer + lm)
    fed = run["prompt_tokens_computed"] + run["output_tokens"] - run["completed"]
    assert c["matmul_flops"] == fed * per_layer + run["output_tokens"] * lm
    assert c["attention_flops"] > 0 and c["gemm_gflops"] > 0
    assert 0 < c["ceiling_fraction"] < 1.5
    assert c["ideal_matmul_s"] == pytest.approx(c["matmul_flops"] / (c["gemm_gflops"] * 1e9))
    assert "of the machine's ceiling" in capsys.readouterr().out
    skipped = run_offline(tiny_model_dir, tmp_path, "--num-requests", "2", "--output-len", "2:2", "--no-ceiling")
    assert "ceiling" not in skipped
