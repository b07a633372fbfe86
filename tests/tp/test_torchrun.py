"""Tensor parallelism under torchrun: every rank runs the same command line.

``torchrun --nproc-per-node 2 -m cli bench offline --tensor-parallel-size 2``:
the command line makes rank 0 the engine (the driver) and rank 1 a worker
(``cli.main._run_tp_worker``), the two meet through torchrun's ``env://``
rendezvous instead of a spawned worker, and both exit 0 once rank 0 is done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import make_tiny_hf_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_torchrun_ranks_are_dispatched_by_the_command_line(tmp_path):
    model = make_tiny_hf_model(tmp_path, "llama", num_attention_heads=4, num_key_value_heads=2)
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cli", "bench", "offline", "--model", str(model), "--backend", "cpu",
           "--tensor-parallel-size", "2", "--num-threads", "2", "--num-kv-blocks", "64", "--block-size", "8",
           "--num-requests", "3", "--input-len", "8:16", "--output-len", "5:5", "--no-warmup",
           "--output", str(report)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "tp_worker_ready" in result.stderr and "rank=1" in result.stderr      # rank 1 served as a worker
    run = json.loads(report.read_text())["pagedgen"]                               # rank 0 ran the command
    assert run["output_tokens"] == 3 * 5
