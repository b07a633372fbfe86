"""The GPU check (``bench.gpu_check``, ``scripts/gpu_check.sh``) set up and run on the CPU.

The dry run takes every section through its real code at toy sizes under
the Triton interpreter (this directory's conftest sets ``TRITON_INTERPRET``):
kernels timed, the random model built with transformers, an engine per
graph mode, logits compared with transformers, throughput against HF
``generate()``. The wheel bundle must cover every runtime dependency that
the lent GPU box lacks.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("triton")

from tests.backends.cuda.conftest import NATIVE  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


def bash_array(text: str, name: str) -> list[str]:
    """The words of ``NAME=( ... )`` in a bash script, comments dropped."""
    body = re.search(rf"^{name}=\((.*?)^\)", text, re.S | re.M).group(1)
    return [w for line in body.splitlines() for w in line.split("#")[0].split()]


def project_name(requirement: str) -> str:
    return re.split(r"[<>=;\[ ~!]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_bundle_carries_every_dependency_the_box_lacks():
    script = (ROOT / "scripts" / "gpu_bundle.sh").read_text()
    box = set(bash_array(script, "BOX_HAS"))
    missing = {project_name(w) for w in bash_array(script, "MISSING")}
    floors = {project_name(w) for w in bash_array(script, "FLOORS")}
    assert all("==" in w for w in bash_array(script, "MISSING") + bash_array(script, "FLOORS"))
    assert not missing & box and floors <= box
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {project_name(r) for r in project["dependencies"]} - {"pagedgen-client"}   # clients/ travels
    needed |= {project_name(r) for r in project["optional-dependencies"]["cuda"]}
    needed |= {"pytest", "pytest-timeout", "hypothesis"}                               # the kernel tests
    assert needed <= box | missing, sorted(needed - box - missing)
    assert {"structlog", "gguf", "fastapi", "uvicorn", "grpcio-health-checking", "grpcio-reflection"} <= missing


@pytest.mark.skipif(NATIVE, reason="the dry run is the CPU stand-in of the GPU check")
def test_dry_run_sets_up_and_runs_every_section(tmp_path, capsys):
    from bench.gpu_check.__main__ import main

    code = main(["--dry-run", "--skip", "a", "--skip", "g", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = [(s["letter"], s["status"]) for s in summary["sections"]]
    assert code == 0, out
    assert sections == [("b", "ok"), ("c", "ok"), ("i", "ok"), ("e/f", "ok")] + [
        (x, "ok") for _ in range(3) for x in "defh"] + [("f", "ok")]
    assert summary["plan"] == "dry-run" and summary["triton_interpret"] == "1"
    assert out.count("SUMMARY (") == len(sections)                  # one line after every section
    parity = [s["figures"] for s in summary["sections"] if s["letter"] == "e"]
    assert all(f["vs_hf"]["top1"] == 1.0 and f["vs_hf"]["max_abs"] < 1e-3 for f in parity)
    assert "vs_none" in parity[1] and "vs_none" in parity[2]
    full_startup = [s for s in summary["sections"] if s["letter"] == "d"][2]["figures"]
    assert full_startup["num_graphs"] == 3                           # decode batches 1, 2, 4 of max_num_seqs=4
    gemm = next(s["figures"] for s in summary["sections"] if s["letter"] == "i")
    assert [(c["bits"], c["n"], c["k"], c["m"]) for c in gemm["cases"]] == [(4, 96, 64, 1), (4, 96, 64, 3)]
    quantized = summary["sections"][-1]
    assert "4-bit" in quantized["title"] and quantized["figures"]["vs_dense"] > 0
    assert 0 < quantized["figures"]["packed_bytes"] < quantized["figures"]["dense_bytes"] / 4   # of float32 here


def test_gpu_quantizer_rounds_each_weight_to_its_group_grid():
    import torch

    from backends.cuda.kernels.quant_matmul import dequantize_weight
    from bench.gpu_check.quant import quantize_weight

    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    for bits in (4, 8):
        q = quantize_weight(weight, bits, 32)
        assert q.codes.dtype == torch.int32 and q.codes.shape == (48, 128 * bits // 32) and q.scales.shape == (48, 4)
        back = dequantize_weight(q.codes, q.scales, q.biases, bits, 32, torch.float32)
        step = q.scales.float().repeat_interleave(32, dim=1)                      # [48, 128]
        # half a step; the top code may fall short of the max by the float16 rounding of the scale
        assert ((back - weight).abs() <= step * (0.5 + (1 << bits) / 1024)).all()
        assert ((back - weight).abs().max(dim=1).values > 0).all()                # really rounded
