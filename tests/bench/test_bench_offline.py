"""``pagedgen bench offline`` on the tiny model: the same figures, JSON and plot as ``bench serve``."""

from __future__ import annotations

import json

from bench.datasets import DatasetConfig, take
from cli.main import main
from tests.bench.test_bench_serve import check_level


def run_offline(model_dir, tmp_path, *extra: str) -> dict:
    out = tmp_path / "offline.json"
    rc = main(["bench", "offline", "--model", model_dir, "--backend", "cpu", "--num-kv-blocks", "256",
               "--output", str(out), "--save-requests", *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_random_workload_vs_hf_with_json_and_plot(tiny_model_dir, tmp_path, capsys):
    png = tmp_path / "offline.png"
    report = run_offline(tiny_model_dir, tmp_path, "--num-requests", "6", "--input-len", "8:30",
                         "--output-len", "4:10", "--compare", "hf", "--hf-batch-size", "4", "--plot", str(png))
    run = report["pagedgen"]
    check_level(run, 6)
    assert (run["completed"], run["failed"]) == (6, 0)
    from engine.model_loader import load_model

    tok = load_model(tiny_model_dir).tokenizer
    convs = take(DatasetConfig(input_len=(8, 30), output_len=(4, 10)), 6, tok.vocab_size, tok.all_special_ids)
    assert run["total_input_tokens"] == run["prompt_tokens"] == sum(len(c.turns[0].prompt_token_ids) for c in convs)
    assert run["total_output_tokens"] == run["output_tokens"] == sum(c.turns[0].max_tokens for c in convs)
    assert report["hf"]["output_tokens"] == run["output_tokens"]
    assert report["speedup_vs_hf"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "Median TPOT (ms)" in out and "speedup" in out


def test_multi_turn_offline_counts_every_turn(tiny_model_dir, tmp_path):
    report = run_offline(tiny_model_dir, tmp_path, "--dataset", "multi-turn", "--num-requests", "2", "--turns", "3",
                         "--suffix-len", "16", "--output-len", "4")
    run = report["pagedgen"]
    check_level(run, 6)
    assert run["total_input_tokens"] == 2 * (16 + 36 + 56)
    assert run["prefix_cache_hit_tokens"] == run["cached_prompt_tokens"] > 0
    assert run["prefix_cache_hit_rate"] == run["cached_prompt_tokens"] / run["total_input_tokens"]
