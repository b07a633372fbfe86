"""The oneDNN prepacked linear of the cpu backend (backends/cpu/linear.py) against torch.mm, and its switch."""

from __future__ import annotations

import pytest
import torch

from backends.cpu.backend import CPUBackend
from backends.cpu.linear import NATIVE_MAX_ROWS, ONEDNN_SWITCH, OneDNNLinear, cpu_linear, onednn_available, \
    onednn_enabled, projections

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN linear on this CPU")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class CountingLinear:
    """A fallback that records the row counts it was called with, then runs ``cpu_linear``."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def __call__(self, x, w, bias=None):
        self.rows.append(x.shape[0])
        return cpu_linear(x, w, bias)


@pytest.mark.parametrize("rows", [9, 64, 300, 2048])
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (37, 100), (4099, 64), (5, 3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_equals_torch_mm(rows, out_features, in_features, with_bias):
    x, w = randn(rows, in_features), randn(out_features, in_features, seed=1) * in_features ** -0.5
    bias = randn(out_features, seed=2) if with_bias else None
    fallback = CountingLinear()
    linear = OneDNNLinear(fallback)
    assert linear.pack([w]) == 1 and linear.packed_bytes == w.numel() * 4
    out = linear(x, w, bias)                                                    # [rows, out]
    want = torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
    assert out.shape == (rows, out_features) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)                 # summation order only
    assert fallback.rows == []


def test_strided_input_rows():
    base = randn(64, 700)
    x = base[:, 50:626]                                                         # rows of 576 floats, 700 apart
    w = randn(300, 576, seed=1) * 576 ** -0.5
    linear = OneDNNLinear()
    linear.pack([w])
    torch.testing.assert_close(linear(x, w), torch.mm(x, w.t()), rtol=1e-5, atol=1e-4)


def test_few_rows_and_unpacked_weights_take_the_fallback():
    w, other = randn(200, 64, seed=1), randn(200, 64, seed=2)
    fallback = CountingLinear()
    linear = OneDNNLinear(fallback)
    assert linear.pack([w, w, None, randn(7), w.bfloat16()]) == 1              # once; 1-D and bfloat16 skipped
    for rows in (1, NATIVE_MAX_ROWS):
        x = randn(rows, 64)
        torch.testing.assert_close(linear(x, w), torch.mm(x, w.t()), rtol=1e-5, atol=1e-4)
    x = randn(NATIVE_MAX_ROWS + 1, 64)
    linear(x, other)                                                            # never packed
    linear(x, w[:100])                                                          # a slice: another tensor
    linear(x, w)                                                                # packed: oneDNN
    assert fallback.rows == [1, NATIVE_MAX_ROWS, NATIVE_MAX_ROWS + 1, NATIVE_MAX_ROWS + 1]
    linear.clear()
    linear(x, w)
    assert fallback.rows[-1] == NATIVE_MAX_ROWS + 1 and linear.packed_bytes == 0


def test_switch_off_keeps_cpu_linear(monkeypatch):
    from tests.backends import tiny_model

    _, config, weights = tiny_model()
    monkeypatch.setenv(ONEDNN_SWITCH, "1")
    on = CPUBackend(config, weights)
    assert isinstance(on.model.linear, OneDNNLinear)
    distinct = {id(w): w for w in projections(on.model.weights)}.values()    # the tied LM head once
    assert on.onednn.packed_bytes == sum(w.numel() * 4 for w in distinct)
    monkeypatch.setenv(ONEDNN_SWITCH, "0")
    assert not onednn_enabled()
    off = CPUBackend(config, weights)
    assert off.onednn is None and off.model.linear is cpu_linear
    monkeypatch.setenv(ONEDNN_SWITCH, "1")
    assert CPUBackend(config, weights, onednn=False).model.linear is cpu_linear
    assert CPUBackend(config, weights, dtype="bfloat16").onednn is None           # float32 only
    with pytest.raises(ValueError, match="onednn=True needs dtype float32"):
        CPUBackend(config, weights, dtype="bfloat16", onednn=True)
    monkeypatch.setenv(ONEDNN_SWITCH, "maybe")
    with pytest.raises(ValueError, match=ONEDNN_SWITCH):
        onednn_enabled()


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])                   # qwen2: QKV bias
def test_backend_logits_equal_with_and_without_onednn(architecture):
    from tests.backends import PagedSequence, random_tokens, step, tiny_model

    _, config, weights = tiny_model(architecture, seed=3)
    packed, plain = CPUBackend(config, weights, onednn=True), CPUBackend(config, weights, onednn=False)
    for b in (packed, plain):
        b.allocate_kv_cache(64, 16)
    prompts = [random_tokens(n, config.vocab_size, seed=n) for n in (40, 7, 25, 11, 30, 9, 13, 21, 17, 5)]
    seqs = {name: [PagedSequence(f"r{i}", list(p), list(range(6 * i, 6 * i + 6)), 16) for i, p in enumerate(prompts)]
            for name in ("packed", "plain")}
    for name, b in (("packed", packed), ("plain", plain)):                    # a 188-token prefill step
        b.compute_logits(step([s.chunk(len(s.token_ids) - 1) for s in seqs[name]], 16))
    for _ in range(3):                                                          # decode steps of 10 rows: oneDNN
        got = packed.compute_logits(step([s.chunk(1) for s in seqs["packed"]], 16))      # [10, V]
        want = plain.compute_logits(step([s.chunk(1) for s in seqs["plain"]], 16))       # [10, V]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        for group in seqs.values():
            for s, token in zip(group, want.argmax(-1).tolist()):
                s.token_ids.append(token)


def test_calibration_reports_the_onednn_rate_beside_the_ceiling():
    from bench.ceiling import calibrate_gemm, ceiling_report, format_ceiling
    from model.config import ModelConfig

    config = ModelConfig(architecture="llama", vocab_size=400, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=256)
    gemm = calibrate_gemm(config, rows=64, seconds=0.05)
    assert gemm["gflops"] > 0 and gemm["onednn_gflops"] > 0
    c = ceiling_report({"matmul_flops": 10**9, "attention_flops": 1, "layer_tokens": 1, "lm_head_rows": 1,
                        "flops_per_prefill_token": 1, "flops_per_decode_token": 2}, gemm, elapsed_s=1.0)
    assert c["gemm_gflops"] == gemm["gflops"]                                   # the ceiling stays torch.mm's
    assert "oneDNN, prepacked weights" in format_ceiling(c)
    assert "onednn_gflops" not in calibrate_gemm(config, rows=64, seconds=0.05, onednn=False)
