"""The W4A16/W8A16 Triton GEMM against dequantize-then-matmul (interpreter on CPU, native on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from backends.cuda.kernels.quant_matmul import (  # noqa: E402
    CONFIGS, QuantMatmulConfig, choose_config, dequantize_weight, quant_matmul, quant_matmul_ref)
from model.weights.gguf_quant import pack_blocks  # noqa: E402
from model.weights.quant import QuantizedTensor, from_codes  # noqa: E402

from tests.backends.cuda.conftest import DEVICE, DTYPES, NATIVE  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}   # of the largest |output|


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def random_weight(out_features: int, in_features: int, bits: int, group_size: int, seed: int) -> QuantizedTensor:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, (out_features, in_features), dtype=np.uint8)
    groups = in_features // group_size
    scales = rng.uniform(0.5, 1.5, (out_features, groups)) * 0.1 / (1 << bits)
    biases = -scales * (1 << (bits - 1)) + rng.normal(0, 0.01, (out_features, groups))
    return from_codes(codes, scales, biases, bits, group_size, "test")


def device_parts(weight: QuantizedTensor, dtype: torch.dtype):
    """codes int32, scales/biases in ``dtype`` on the test device (what a backend uploads)."""
    codes = torch.from_numpy(weight.codes.view(np.int32)).to(DEVICE)
    scales = torch.from_numpy(weight.scales.astype(np.float32)).to(DEVICE, dtype)
    biases = torch.from_numpy(weight.biases.astype(np.float32)).to(DEVICE, dtype)
    return codes, scales, biases


def assert_matches_reference(x, weight: QuantizedTensor, config: QuantMatmulConfig | None = None):
    codes, scales, biases = device_parts(weight, x.dtype)
    out = quant_matmul(x, codes, scales, biases, weight.bits, weight.group_size, config=config)
    expected = quant_matmul_ref(x, codes, scales, biases, weight.bits, weight.group_size)
    assert out.shape == (x.shape[0], weight.shape[0]) and out.dtype == x.dtype
    error = (out.float() - expected.float()).abs().max().item()
    assert error <= TOL[x.dtype] * expected.float().abs().max().item(), error


# (M, N, K, group): M=1; M not a multiple of the tile; K a multiple of 32 but not of BLOCK_K; N ragged
SHAPES = [(1, 96, 256, 32), (1, 40, 96, 32), (19, 80, 160, 32), (33, 48, 320, 64), (70, 40, 384, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-N{}-K{}-g{}".format(*s))
def test_quant_matmul_matches_dequantize_then_matmul(dtype, bits, shape):
    num_tokens, out_features, in_features, group_size = shape
    weight = random_weight(out_features, in_features, bits, group_size, seed=sum(shape) + bits)
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(num_tokens, in_features, generator=g).to(DEVICE, dtype)
    assert_matches_reference(x, weight)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"m{c.block_m}-n{c.block_n}-k{c.block_k}")
@pytest.mark.parametrize("bits", [4, 8])
def test_every_config_handles_ragged_tiles(config, bits):
    # M, N and K all leave a partial last tile (K = 224 = 7 groups of 32)
    weight = random_weight(config.block_n + 8, 224, bits, 32, seed=bits)
    x = torch.randn(config.block_m + 3, 224, generator=torch.Generator().manual_seed(0)).to(DEVICE, torch.float16)
    assert_matches_reference(x, weight, config)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_reference_reads_the_layout_of_the_gguf_reader(qtype):
    gguf = pytest.importorskip("gguf")
    values = np.random.default_rng(7).standard_normal((32, 256)).astype(np.float32) * 0.05
    weight = pack_blocks(gguf.quants.quantize(values, gguf.GGMLQuantizationType[qtype]), qtype, (32, 256))
    codes, scales, biases = device_parts(weight, torch.float32)
    dequantized = dequantize_weight(codes, scales, biases, weight.bits, weight.group_size, torch.float32)
    np.testing.assert_array_equal(dequantized.cpu().numpy(), weight.dequantize())   # the same values, bit for bit
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.float16)
    assert_matches_reference(x, weight)


def test_out_is_written_in_place_and_empty_batches_launch_nothing():
    weight = random_weight(64, 128, 4, 32, seed=3)
    codes, scales, biases = device_parts(weight, torch.float16)
    x = torch.randn(5, 128).to(DEVICE, torch.float16)
    out = torch.full((5, 64), float("nan"), dtype=torch.float16, device=DEVICE)
    assert quant_matmul(x, codes, scales, biases, 4, 32, out=out) is out
    expected = quant_matmul_ref(x, codes, scales, biases, 4, 32)
    assert (out.float() - expected.float()).abs().max().item() <= TOL[torch.float16] * expected.float().abs().max().item()
    empty = quant_matmul(x[:0], codes, scales, biases, 4, 32)
    assert empty.shape == (0, 64)


def test_bad_arguments_are_refused():
    weight = random_weight(16, 64, 4, 32, seed=0)
    codes, scales, biases = device_parts(weight, torch.float16)
    x = torch.randn(2, 64).to(DEVICE, torch.float16)
    with pytest.raises(ValueError, match="bits"):
        quant_matmul(x, codes, scales, biases, 3, 32)
    with pytest.raises(ValueError, match="codes"):
        quant_matmul(torch.randn(2, 96).to(DEVICE, torch.float16), codes, scales, biases, 4, 32)
    with pytest.raises(ValueError, match="scales"):
        quant_matmul(x, codes, scales[:, :1], biases, 4, 32)
    with pytest.raises(ValueError, match="out"):
        quant_matmul(x, codes, scales, biases, 4, 32, out=torch.empty(2, 16, dtype=torch.float32, device=DEVICE))


def test_choose_config_narrows_tiles_for_decode():
    assert choose_config(1).block_m == 16 and choose_config(16).block_m == 16
    assert choose_config(17).block_m > 16 and choose_config(4096).block_m >= choose_config(64).block_m
    with pytest.raises(ValueError):
        QuantMatmulConfig(block_m=16, block_n=32, block_k=48, num_warps=4, num_stages=2)


@pytest.mark.skipif(not NATIVE, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("bits", [4, 8])
def test_quant_matmul_is_cuda_graph_capturable(bits):
    weight = random_weight(4096, 4096, bits, 32, seed=bits)
    codes, scales, biases = device_parts(weight, torch.bfloat16)
    x = torch.randn(8, 4096, device=DEVICE, dtype=torch.bfloat16)
    out = torch.empty(8, 4096, device=DEVICE, dtype=torch.bfloat16)
    quant_matmul(x, codes, scales, biases, bits, 32, out=out)          # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        quant_matmul(x, codes, scales, biases, bits, 32, out=out)
    x.copy_(torch.randn_like(x))
    graph.replay()
    expected = quant_matmul_ref(x, codes, scales, biases, bits, 32)
    assert (out.float() - expected.float()).abs().max().item() <= TOL[torch.bfloat16] * expected.float().abs().max().item()
