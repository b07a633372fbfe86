"""The native batched GEMM (gemm.c, through ``DecodeOps.linear`` past ``max_rows``) against F.linear,
and how ``cpu_linear`` and the cpu backend choose it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backends.cpu.linear import NATIVE_GEMM_MAX_ROWS, NATIVE_MAX_ROWS, choose_native_max_rows, cpu_linear
from tests.backends.native_kernels import ops, needs_cc, randn  # noqa: F401  (ops: a fixture)

pytestmark = needs_cc


# rows: one vector of token rows and less, whole 64-row tiles and a tail, past the cpu_linear threshold
@pytest.mark.parametrize("rows", [9, 16, 17, 63, 64, 65, 100, 300])
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (37, 100), (5, 3), (4099, 64), (576, 1536)])
def test_gemm_matches_torch(ops, rows, out_features, in_features):
    x, w, b = randn(rows, in_features), randn(out_features, in_features, seed=1), randn(out_features, seed=2)
    out = ops.linear(x, w)
    assert out.is_contiguous() and out.shape == (rows, out_features)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ops.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_gemm_rows_do_not_depend_on_the_batch_or_the_threads(ops):
    # every output is one FMA chain in k order: the same bits whatever else is in the batch
    x, w = randn(150, 576), randn(1000, 576, seed=1)
    whole = ops.linear(x, w, num_threads=1)
    for threads in (2, 3):
        assert torch.equal(ops.linear(x, w, num_threads=threads), whole)
    for start, end in ((0, 9), (5, 40), (64, 150), (1, 130)):
        assert torch.equal(ops.linear(x[start:end], w), whole[start:end])


def test_gemm_reads_strided_rows(ops):
    base = randn(40, 700)
    x = base[:, 50:626]                                      # rows of 576 floats, 700 apart
    w, b = randn(300, 576, seed=1), randn(300, seed=2)
    assert torch.equal(ops.linear(x, w, b), ops.linear(x.contiguous(), w, b))
    torch.testing.assert_close(ops.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_gemm_keeps_infinities_and_nans(ops):
    x, w = randn(20, 64), randn(50, 64, seed=1)
    x[3, 7], x[11, 0] = float("inf"), float("nan")
    out, ref = ops.linear(x, w), F.linear(x, w)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    finite = ref.isfinite()
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-5, atol=1e-4)


def test_cpu_linear_uses_the_native_gemms_up_to_its_threshold(ops):
    w = randn(300, 64, seed=1)
    for rows in (NATIVE_MAX_ROWS, NATIVE_MAX_ROWS + 1, NATIVE_GEMM_MAX_ROWS):
        x = randn(rows, 64)
        assert torch.equal(cpu_linear(x, w), ops.linear(x, w))
    x = randn(40, 64)
    blas = cpu_linear(x, w, native_max_rows=NATIVE_MAX_ROWS)          # the threshold lowered: BLAS
    torch.testing.assert_close(blas, ops.linear(x, w), rtol=1e-5, atol=1e-4)
    past = randn(NATIVE_GEMM_MAX_ROWS + 1, 64)
    torch.testing.assert_close(cpu_linear(past, w), F.linear(past, w), rtol=1e-5, atol=1e-4)


def test_choose_native_max_rows_picks_one_of_the_two_thresholds(ops):
    weights = [randn(960, 576, seed=s) for s in range(3)] + [randn(576, 1536, seed=9)]
    rows, rates = choose_native_max_rows(weights, rows=16, passes=1)
    assert rows in (NATIVE_MAX_ROWS, NATIVE_GEMM_MAX_ROWS)
    assert set(rates) == {"native_16_gflops", "blas_16_gflops"} and all(r > 0 for r in rates.values())
    assert choose_native_max_rows([randn(4, 4).t()]) == (NATIVE_MAX_ROWS, {})        # nothing it can time
