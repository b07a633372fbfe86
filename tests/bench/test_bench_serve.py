"""``pagedgen bench serve`` against a real server (tiny model, loopback):
the JSON holds every figure, with values that fit the workload sent."""

from __future__ import annotations

import json

import pytest

from bench.datasets import DatasetConfig, take
from bench.report import LATENCIES
from cli.main import main

STAT_ORDER = ("min", "median", "p90", "p99", "max")


def run_bench(server, tmp_path, *extra: str, name: str = "run") -> dict:
    out = tmp_path / f"{name}.json"
    rc = main(["bench", "serve", "--server", server.address, "--no-progress", "--output", str(out),
               "--save-requests", *extra])
    assert rc == 0
    return json.loads(out.read_text())


def expected_tokens(server, cfg: DatasetConfig, num: int) -> tuple[int, int]:
    """Prompt and output tokens of the first ``num`` single-turn requests of ``cfg`` on this server."""
    info = server.engine.model_info
    convs = take(cfg, num, info.vocab_size, info.eos_token_ids)
    return (sum(len(c.turns[0].prompt_token_ids) for c in convs), sum(c.turns[0].max_tokens for c in convs))


def check_level(level: dict, num_sent: int) -> None:
    """Figures every level must satisfy, whatever the load."""
    assert level["completed"] + level["failed"] == num_sent == len(level["requests"])
    assert sum(level["errors"].values()) == level["failed"]
    d = level["duration_s"]
    assert d > 0
    assert level["request_throughput"] == pytest.approx(level["completed"] / d)
    assert level["output_throughput"] == pytest.approx(level["total_output_tokens"] / d)
    assert level["total_token_throughput"] == pytest.approx(
        (level["total_input_tokens"] + level["total_output_tokens"]) / d)
    for key, _ in LATENCIES:
        dist = level[key]
        values = [dist[s] for s in STAT_ORDER]
        assert all(v is not None and v >= 0 for v in values), (key, dist)
        assert values == sorted(values), (key, dist)
        assert dist["min"] <= dist["mean"] <= dist["max"]
    assert level["ttft_ms"]["count"] == level["e2el_ms"]["count"] == level["completed"]
    for r in level["requests"]:
        if r["ok"]:
            assert 0 < r["ttft_s"] <= r["latency_s"]
            assert len(r["itls_s"]) <= r["output_tokens"] - 1
            assert r["latency_s"] * 1000 <= level["e2el_ms"]["max"] + 1e-6
    assert level["ttft_ms"]["max"] <= level["e2el_ms"]["max"]
    assert level["ttft_ms"]["median"] <= level["e2el_ms"]["median"]


def test_concurrency_sweep_reports_every_figure_and_plots(bench_server, tmp_path):
    png = tmp_path / "sweep.png"
    report = run_bench(bench_server, tmp_path, "--concurrency", "1,4", "--num-requests", "6",
                       "--input-len", "8:40", "--output-len", "4:12", "--slo-ttft-ms", "60000",
                       "--slo-tpot-ms", "60000", "--plot", str(png))
    assert report["benchmark"] == "serve"
    assert report["config"]["concurrency"] == "1,4" and report["config"]["model"]["name"] == "tiny-llama"
    levels = report["levels"]
    assert [lv["label"] for lv in levels] == ["c=1", "c=4"]
    n_in, n_out = expected_tokens(bench_server, DatasetConfig(input_len=(8, 40), output_len=(4, 12)), 6)
    for level in levels:
        check_level(level, 6)
        assert (level["completed"], level["failed"]) == (6, 0)
        # Random prompts, EOS ignored: exactly the tokens drawn, every time.
        assert (level["total_input_tokens"], level["total_output_tokens"]) == (n_in, n_out)
        # Each level has its own cache salt: the second does not hit the first's blocks.
        assert level["cached_prompt_tokens"] == 0 and level["server"]["prefix_cache_hits"] == 0
        assert level["server"]["prefix_cache_queries"] == n_in
        assert level["goodput"]["good_requests"] == 6
        assert level["goodput"]["request_goodput"] == pytest.approx(level["request_throughput"])
        assert level["tpot_ms"]["count"] == sum(1 for r in level["requests"] if r["output_tokens"] > 1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_multi_turn_resends_history_and_hits_the_prefix_cache(bench_server, tmp_path):
    report = run_bench(bench_server, tmp_path, "--dataset", "multi-turn", "--num-requests", "3", "--turns", "3",
                       "--suffix-len", "16", "--output-len", "4", "--concurrency", "3")
    (level,) = report["levels"]
    check_level(level, 9)
    assert level["completed"] == 9
    # Turn t sends 16 new tokens after the history: 16, 16+4+16, 36+4+16 per conversation.
    assert level["total_input_tokens"] == 3 * (16 + 36 + 56)
    assert level["total_output_tokens"] == 9 * 4
    assert level["cached_prompt_tokens"] > 0 and level["prefix_cache_hit_rate"] > 0
    assert level["server"]["prefix_cache_hits"] == level["cached_prompt_tokens"]


def test_request_rate_with_jsonl_prompts_and_chats(bench_server, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join([
        json.dumps({"prompt": "The cat watches the morning light", "max_tokens": 5}),
        json.dumps({"messages": [{"role": "user", "content": "A small robot builds a paper boat"}],
                    "max_tokens": 3}),
        json.dumps({"prompt_token_ids": [5, 6, 7, 8, 9], "max_tokens": 4}),
    ]) + "\n")
    report = run_bench(bench_server, tmp_path, "--dataset", "jsonl", "--dataset-path", str(data),
                       "--ignore-eos", "--request-rate", "40", "--num-requests", "5")
    (level,) = report["levels"]
    assert level["request_rate"] == 40.0 and level["label"] == "rate=40/s"
    check_level(level, 5)
    assert level["completed"] == 5
    # The file repeats from its start: 5 + 3 + 4 + 5 + 3 tokens.
    assert level["total_output_tokens"] == 20
    starts = sorted(r["start_s"] for r in level["requests"])
    assert starts[-1] > 0                       # Poisson arrivals, not all at once


def test_failed_requests_are_counted_by_status_code(bench_server, tmp_path):
    # The tiny model's context is 512 tokens: these prompts are refused.
    report = run_bench(bench_server, tmp_path, "--input-len", "600", "--output-len", "4", "--num-requests", "3")
    (level,) = report["levels"]
    assert (level["completed"], level["failed"]) == (0, 3)
    assert level["errors"] == {"INVALID_ARGUMENT": 3}
    assert level["request_throughput"] == 0 and level["ttft_ms"]["count"] == 0


def test_duration_bounds_a_run(bench_server, tmp_path):
    report = run_bench(bench_server, tmp_path, "--concurrency", "2", "--duration", "0.5",
                       "--input-len", "8", "--output-len", "8")
    (level,) = report["levels"]
    check_level(level, len(level["requests"]))
    assert level["completed"] >= 2 and level["failed"] == 0
    assert max(r["start_s"] for r in level["requests"]) < 0.5 + 0.2


def test_bad_load_options_are_usage_errors(bench_server, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "serve", "--server", bench_server.address, "--concurrency", "1,2",
              "--request-rate", "1,2", "--no-progress"])
    assert e.value.code == 2
    assert "sweep either" in capsys.readouterr().err


def test_compare_offline_launches_a_server_and_reports_what_the_service_costs(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    png = tmp_path / "cmp.png"
    rc = main(["bench", "serve", "--compare", "offline", "--repeat", "2", "--model", tiny_model_dir,
               "--backend", "cpu", "--num-kv-blocks", "256", "--num-threads", "1", "--concurrency", "4",
               "--num-requests", "6", "--input-len", "8:40", "--output-len", "4:12", "--no-progress",
               "--output", str(out), "--plot", str(png)])
    assert rc == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert 0 < report["start_to_serving_s"] < 120 and "start to SERVING" in printed
    assert len(report["repeats"]) == 2 and "median" in printed
    for rep in report["repeats"]:
        offline, (level,) = rep["offline"], rep["levels"]
        # The same workload both ways: the same tokens in and out, all at once vs. through gRPC.
        assert (offline["total_input_tokens"], offline["total_output_tokens"]) == \
            (level["total_input_tokens"], level["total_output_tokens"])
        assert offline["completed"] == level["completed"] == 6 and offline["cached_prompt_tokens"] == 0
        ratio = level["vs_offline"]["output_throughput_ratio"]
        assert ratio == pytest.approx(level["output_throughput"] / offline["output_throughput"])
        delivery = level["server"]["delivery"]
        # Every streamed message was timed: at least one per request, at most one per token and the final
        # one (a faster engine than the client coalesces tokens into fewer messages: 53 tokens in 9 was seen).
        assert level["completed"] <= delivery["messages"] <= level["total_output_tokens"] + level["completed"]
        assert 0 <= delivery["p50_ms"] <= delivery["p90_ms"] <= delivery["p99_ms"]
        # Each gap between streamed tokens, paired with the engine's gap between their steps.
        added = level["itl_added_ms"]
        assert added["count"] == level["itl_ms"]["count"] > 0
        assert 0 < level["delivery_lag_ms"]["count"] <= level["total_output_tokens"]    # one per message
        assert 0 < level["delivery_lag_ms"]["min"] <= level["delivery_lag_ms"]["max"] < level["e2el_ms"]["max"]
        assert "itl_added_ms" not in offline
    assert "Median ITL added (ms)" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_histogram_quantiles_interpolate_inside_the_bucket():
    from bench.serve import histogram_quantile

    before = [(0.001, 10.0), (0.002, 10.0), (0.005, 10.0), (float("inf"), 10.0)]
    after = [(0.001, 10.0), (0.002, 30.0), (0.005, 40.0), (float("inf"), 50.0)]
    # 40 new observations: 20 in (1, 2] ms, 10 in (2, 5] ms, 10 above 5 ms.
    assert histogram_quantile(0.25, before, after) == pytest.approx(0.0015)
    assert histogram_quantile(0.5, before, after) == pytest.approx(0.002)
    assert histogram_quantile(0.625, before, after) == pytest.approx(0.0035)
    assert histogram_quantile(0.99, before, after) == pytest.approx(0.005)    # the +Inf bucket: its lower bound
    assert histogram_quantile(0.5, after, after) is None
