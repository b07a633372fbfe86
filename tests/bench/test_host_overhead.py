"""``bench host-overhead``: schedule + prepare + update per decode step, without a model."""

from __future__ import annotations

import importlib.util
import json

import pytest

from bench import host_overhead
from cli.main import main


def test_run_times_every_part_at_a_small_batch():
    r = host_overhead.run(num_requests=8, context_len=48, steps=4, warmup_steps=1)
    assert (r["num_requests"], r["context_len"], r["steps"], r["backend"]) == (8, 48, 4, "cpu")
    assert r["setup_steps"] >= 1
    assert all(r[k] > 0 for k in ("schedule_ms", "prepare_ms", "update_ms", "total_ms", "cpu_total_ms"))
    assert max(r["schedule_ms"], r["prepare_ms"], r["update_ms"]) <= r["total_ms"]
    assert "profile" not in r
    with pytest.raises(ValueError):
        host_overhead.run(num_requests=0)


def test_persistent_batch_writes_only_the_rows_whose_request_gained_a_block():
    r = host_overhead.run(num_requests=32, context_len=64, steps=32, warmup_steps=1, block_size=16)
    assert r["row_writes_per_step"] is not None
    assert 0 < r["row_writes_per_step"] <= 32 / 16 + 1          # one request in 16 opens a block per step


def test_profile_names_the_scheduler_and_the_backend():
    r = host_overhead.run(num_requests=4, context_len=40, steps=2, warmup_steps=1, profile_rows=200)
    assert "scheduler.py" in r["profile"] and "backend.py" in r["profile"]


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "host.json"
    assert main(["bench", "host-overhead", "--num-requests", "4", "--context-len", "40", "--steps", "3",
                 "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "host-overhead" and r["target_ms"] == 1.5 and r["total_ms"] > 0
    text = capsys.readouterr().out
    assert "schedule" in text and "prepare" in text and "update" in text and "target <= 1.5 ms" in text


@pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="needs mlx")
def test_metal_backend_preparation():
    r = host_overhead.run(num_requests=4, context_len=40, steps=3, warmup_steps=1, backend_name="metal")
    assert r["backend"] == "metal" and r["prepare_ms"] > 0 and r["total_ms"] > 0
