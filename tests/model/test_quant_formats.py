"""Quantized weights read without dequantizing: every GGUF format and MLX checkpoints.

Each GGUF format is written into a real GGUF file (by ``gguf``'s own quantizer
where it has one, else as random valid blocks), read back through
``model.weights.gguf_quant`` and compared with ``gguf.quants.dequantize``; the
packed layout is also handed to MLX (``mx.dequantize``, ``mx.quantized_matmul``),
which must read it the same way.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from model.weights import gguf_reader, hf_reader  # noqa: E402
from model.weights.gguf_quant import BLOCK_SIZES, pack_blocks, pack_tensor  # noqa: E402
from model.weights.quant import (  # noqa: E402
    SUPPORTED_BITS, QuantizedTensor, concat_rows, dequantize_all, from_codes, pack_codes, unpack_codes,
    weight_format, weight_nbytes)
from tests import factories  # noqa: E402

T = gguf.GGMLQuantizationType
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]   # gguf can quantize these
K_QUANTS = ["Q4_K", "Q5_K", "Q6_K"]                 # gguf only dequantizes these
BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 8, "Q5_1": 8, "Q8_0": 8, "Q4_K": 4, "Q5_K": 8, "Q6_K": 8}
# byte offsets of the float16 super-block factors of the K-quants
K_FLOAT16_OFFSETS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, str]]):
    """Write raw quantized ``tensors`` (name -> (bytes [rows, row_bytes], ggml type)) and read the file back."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=T[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def random_k_blocks(qtype: str, rows: int, in_features: int, rng) -> np.ndarray:
    """Valid ``qtype`` blocks: random bytes, with finite random float16 super-block factors."""
    block_size, type_size = BLOCK_SIZES[qtype]
    n = rows * in_features // block_size
    blocks = rng.integers(0, 256, (n, type_size), dtype=np.uint8)
    for offset in K_FLOAT16_OFFSETS[qtype]:
        factor = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 0, n)).astype(np.float16)
        blocks[:, offset:offset + 2] = factor.view(np.uint8).reshape(n, 2)
    return blocks.reshape(rows, -1)


def q6_k_blocks(values: np.ndarray) -> np.ndarray:
    """A plain Q6_K quantizer (max-abs scales, round to nearest) -> raw blocks ``[n, 210]``."""
    x = values.reshape(-1, 16, 16).astype(np.float32)                        # [n, sub-block, 16]
    n = x.shape[0]
    peak = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]  # [n, 16] signed max-abs
    sub_scale = peak / -32
    largest = np.take_along_axis(sub_scale, np.abs(sub_scale).argmax(-1)[:, None], -1)[:, 0]
    d = (largest / -128).astype(np.float16)
    d32 = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 == 0, 0, np.clip(np.rint(sub_scale / d32), -128, 127)).astype(np.int8)
        step = (d32 * sc)[..., None]
        q = np.where(step == 0, 0, np.clip(np.rint(x / step), -32, 31)).astype(np.int32) + 32
    q = q.reshape(n, 2, 4, 32).astype(np.uint8)                              # [n, half, quarter, 32]
    ql = np.concatenate([(q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4), (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)], 2)
    qh = sum((q[:, :, k] >> 4) << (2 * k) for k in range(4)).astype(np.uint8)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d.view(np.uint8).reshape(n, 2)], 1)


@pytest.mark.parametrize("qtype", LEGACY)
def test_gguf_quantizer_output_reads_back_exactly(tmp_path, qtype):
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((48, 192)) * 0.05).astype(np.float32)
    tensor = write_gguf(tmp_path / "t.gguf", {"w": (gguf.quants.quantize(weight, T[qtype]), qtype)})["w"]
    packed = pack_tensor(tensor)
    expected = gguf.quants.dequantize(tensor.data, T[qtype]).reshape(48, 192)
    assert packed.shape == (48, 192) and packed.bits == BITS[qtype] and packed.group_size == 32
    assert packed.scales.dtype == np.float16 and packed.is_exact and packed.source == qtype
    np.testing.assert_array_equal(packed.dequantize(), expected)
    groups = 48 * 192 // 32
    assert packed.nbytes == groups * (32 * packed.bits // 8 + 4)       # codes + float16 scale and bias per group


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_k_quant_blocks_read_back_as_gguf_dequantizes_them(tmp_path, qtype):
    rng = np.random.default_rng(2)
    data = random_k_blocks(qtype, 16, 512, rng)
    tensor = write_gguf(tmp_path / "t.gguf", {"w": (data, qtype)})["w"]
    packed = pack_tensor(tensor)
    expected = gguf.quants.dequantize(tensor.data, T[qtype]).reshape(16, 512)
    assert packed.shape == (16, 512) and packed.bits == BITS[qtype] and packed.group_size == 32
    got = packed.dequantize()
    if qtype != "Q6_K":
        assert packed.is_exact
        np.testing.assert_array_equal(got, expected)
        return
    # Q6_K is requantized: per 32-group, the sub-block of 16 with the larger |scale| is exact and the
    # other is within half a step of the new grid (a whole step where the code would be 256)
    assert not packed.is_exact
    step = np.abs(packed.scales.astype(np.float32)).repeat(32, axis=1)                # [16, 512]
    error = np.abs(got - expected)
    sub = data.reshape(-1, 210)[:, 192:208].view(np.int8).astype(np.int32).reshape(16, 16, 2)   # [row, group, half]
    dominant = np.where(np.abs(sub[..., 0]) >= np.abs(sub[..., 1]), 0, 1)              # [row, group]
    is_dominant = (np.arange(32)[None, None, :] // 16 == dominant[..., None]).reshape(16, 512)
    assert np.array_equal(got[is_dominant], expected[is_dominant])
    clipped = packed.unpack() == 255
    assert np.all(error[~is_dominant & ~clipped] <= step[~is_dominant & ~clipped] * (0.5 + 1e-6))
    assert np.all(error <= step * (1 + 1e-6))
    assert 0 < np.count_nonzero(error) < error.size


def test_q6_k_requantization_error_on_realistic_weights():
    rng = np.random.default_rng(3)
    for weight in (rng.standard_normal((128, 1024)) * 0.02, rng.standard_t(3, (128, 1024)) * 0.02):
        weight = weight.astype(np.float32)
        blocks = q6_k_blocks(weight)
        q6 = gguf.quants.dequantize(blocks.reshape(128, -1), T.Q6_K)
        q6_error = np.sqrt(np.mean((q6 - weight) ** 2))
        assert q6_error < 0.03 * np.sqrt(np.mean(weight ** 2))          # the test's quantizer is a valid Q6_K
        requant = pack_blocks(blocks, "Q6_K", (128, 1024)).dequantize()
        added = np.sqrt(np.mean((requant - q6) ** 2))
        assert 0.1 < added / q6_error < 0.26                            # the module docstring's 20-23%
        assert np.mean(requant == q6) > 0.45                            # the dominant halves stay exact


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_codes_pack_into_little_endian_words(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, (5, 128), dtype=np.uint8)
    words = pack_codes(codes, bits)
    assert words.dtype == np.uint32 and words.shape == (5, 128 * bits // 32)
    np.testing.assert_array_equal(unpack_codes(words, bits, 128), codes)
    if bits in (4, 8):
        per_word = 32 // bits
        first = sum(int(codes[0, i]) << (bits * i) for i in range(per_word))
        assert int(words[0, 0]) == first


def test_relayout_and_concat_rows_are_lossless(tmp_path):
    rng = np.random.default_rng(4)
    q4k = write_gguf(tmp_path / "a.gguf", {"w": (random_k_blocks("Q4_K", 8, 256, rng), "Q4_K")})["w"]
    q6k = write_gguf(tmp_path / "b.gguf", {"w": (random_k_blocks("Q6_K", 4, 256, rng), "Q6_K")})["w"]
    a, b = pack_tensor(q4k), pack_tensor(q6k)
    fused = concat_rows([a, b, a])
    assert (fused.bits, fused.group_size, fused.source, fused.is_exact) == (8, 32, "Q4_K+Q6_K", False)
    np.testing.assert_array_equal(fused.dequantize(), np.concatenate([a.dequantize(), b.dequantize(), a.dequantize()]))
    wide = from_codes(rng.integers(0, 16, (3, 256), dtype=np.uint8), rng.standard_normal((3, 2)),
                      rng.standard_normal((3, 2)), 4, 128, "test")
    np.testing.assert_array_equal(wide.relayout(8, 32).dequantize(), wide.dequantize())
    with pytest.raises(ValueError):
        wide.relayout(3, 128)


def test_quantized_tensor_rejects_inconsistent_parts():
    codes = np.zeros((4, 8), dtype=np.uint32)                      # 64 values at 4 bits
    scales = np.ones((4, 2), dtype=np.float16)
    QuantizedTensor(codes, scales, scales, bits=4, group_size=32, source="t")
    with pytest.raises(ValueError, match="scales and biases"):
        QuantizedTensor(codes, scales, scales, bits=4, group_size=64, source="t")
    with pytest.raises(ValueError, match="group_size"):
        QuantizedTensor(codes, scales, scales, bits=4, group_size=16, source="t")
    with pytest.raises(ValueError, match="uint32"):
        QuantizedTensor(codes.astype(np.int32), scales, scales, bits=4, group_size=32, source="t")


# --- MLX reads the same layout ---------------------------------------------------------------------


@pytest.mark.parametrize("qtype", LEGACY + K_QUANTS)
def test_mlx_reads_the_gguf_derived_layout(tmp_path, qtype):
    mx = pytest.importorskip("mlx.core")
    rng = np.random.default_rng(5)
    if qtype in LEGACY:
        data = gguf.quants.quantize((rng.standard_normal((24, 256)) * 0.05).astype(np.float32), T[qtype])
    else:
        data = random_k_blocks(qtype, 24, 256, rng)
    packed = pack_blocks(data, qtype, (24, 256))
    codes = mx.array(packed.codes)
    scales, biases = mx.array(packed.scales.astype(np.float32)), mx.array(packed.biases.astype(np.float32))
    weight = np.array(mx.dequantize(codes, scales, biases, group_size=32, bits=packed.bits))
    np.testing.assert_array_equal(weight, packed.dequantize())
    x = rng.standard_normal((3, 256)).astype(np.float32)
    y = np.array(mx.quantized_matmul(mx.array(x), codes, scales, biases, transpose=True, group_size=32, bits=packed.bits))
    np.testing.assert_allclose(y, x @ packed.dequantize().T, rtol=1e-4, atol=1e-4 * np.abs(y).max())


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_mx_quantize_output_round_trips(bits, group_size):
    mx = pytest.importorskip("mlx.core")
    weight = mx.array(np.random.default_rng(bits * group_size).standard_normal((16, 256)).astype(np.float32))
    codes, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
    packed = QuantizedTensor(np.array(codes), np.array(scales), np.array(biases), bits, group_size, "mlx-affine")
    assert packed.shape == (16, 256)
    expected = np.array(mx.dequantize(codes, scales, biases, group_size=group_size, bits=bits))
    np.testing.assert_array_equal(packed.dequantize(), expected)


def write_mlx_checkpoint(tmp_path, scale_dtype: str):
    """A tiny llama quantized the way mlx_lm.convert does (4-bit group 32, down_proj of layer 1 at 8 bits)."""
    mx = pytest.importorskip("mlx.core")
    source = factories.make_tiny_hf_model(tmp_path, "llama", tie_word_embeddings=True, name="float")
    floats = hf_reader.read_hf_dir(source).weights
    out = tmp_path / "mlx-4bit"
    out.mkdir()
    override = "model.layers.1.mlp.down_proj"
    stored, expected = {}, {}
    for name, array in floats.items():
        module = name.removesuffix(".weight")
        if array.ndim != 2:
            stored[name] = mx.array(array).astype(getattr(mx, scale_dtype))
            expected[name] = np.array(stored[name].astype(mx.float32))
            continue
        bits = 8 if module == override else 4
        codes, scales, biases = mx.quantize(mx.array(array).astype(getattr(mx, scale_dtype)), group_size=32, bits=bits)
        stored.update({name: codes, f"{module}.scales": scales, f"{module}.biases": biases})
        expected[name] = (np.array(codes), np.array(scales.astype(mx.float32)), np.array(biases.astype(mx.float32)), bits)
    mx.save_safetensors(str(out / "model.safetensors"), stored, metadata={"format": "mlx"})
    config = json.loads((source / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4, override: {"group_size": 32, "bits": 8}}
    (out / "config.json").write_text(json.dumps(config))
    return out, expected


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_mlx_checkpoint_triples_are_kept_as_stored(tmp_path, scale_dtype):
    mx = pytest.importorskip("mlx.core")
    path, expected = write_mlx_checkpoint(tmp_path, scale_dtype)
    kept = hf_reader.read_hf_dir(path, keep_quantized=True)
    assert kept.config.tie_word_embeddings and "lm_head.weight" not in kept.weights
    for name, want in expected.items():
        got = kept.weights[name]
        if not isinstance(want, tuple):
            assert isinstance(got, np.ndarray) and got.dtype == np.float32
            np.testing.assert_array_equal(got, want, err_msg=name)
            continue
        codes, scales, biases, bits = want
        assert isinstance(got, QuantizedTensor) and (got.bits, got.group_size, got.source) == (bits, 32, "mlx-affine")
        assert got.scales.dtype == (np.float16 if scale_dtype == "float16" else np.float32)
        np.testing.assert_array_equal(got.codes, codes)
        np.testing.assert_array_equal(got.scales.astype(np.float32), scales)
        np.testing.assert_array_equal(got.biases.astype(np.float32), biases)
        reference = mx.dequantize(mx.array(codes), mx.array(scales), mx.array(biases), group_size=32, bits=bits)
        np.testing.assert_array_equal(got.dequantize(), np.array(reference), err_msg=name)
    assert weight_format(kept.weights) == "mlx-affine"
    dequantized = hf_reader.read_hf_dir(path)                       # the cpu backend's path: float32
    assert all(isinstance(w, np.ndarray) for w in dequantized.weights.values())
    for name, array in dequantize_all(kept.weights).items():
        np.testing.assert_array_equal(dequantized.weights[name], array, err_msg=name)


def test_unsupported_quantized_checkpoints_are_refused(tmp_path):
    path, _ = write_mlx_checkpoint(tmp_path, "float16")
    config = json.loads((path / "config.json").read_text())
    config["quantization"]["mode"] = "mxfp4"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mode 'mxfp4'"):
        hf_reader.read_hf_dir(path)
    del config["quantization"]
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="gptq"):
        hf_reader.read_hf_dir(path)


# --- whole GGUF files ------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_kept_quantized_dequantizes_to_the_float_load(tmp_path, qtype):
    path = factories.make_tiny_gguf(tmp_path, quant=qtype, tie_word_embeddings=False, num_key_value_heads=1)
    kept = gguf_reader.read_gguf(path, keep_quantized=True)
    floats = gguf_reader.read_gguf(path)
    assert kept.config == floats.config and set(kept.weights) == set(floats.weights)
    for name, tensor in kept.weights.items():
        assert isinstance(tensor, QuantizedTensor) != name.endswith("norm.weight"), name
        value = tensor.dequantize() if isinstance(tensor, QuantizedTensor) else tensor
        np.testing.assert_array_equal(value, floats.weights[name], err_msg=name)  # q/k rows unpermuted too
    assert kept.weights["model.norm.weight"].dtype == np.float32
    assert weight_format(kept.weights) == qtype and weight_format(floats.weights) == "float32"
    assert weight_nbytes(kept.weights) < weight_nbytes(floats.weights) / 2.5


@pytest.mark.slow
def test_default_model_kept_quantized_fits_in_its_file_size():
    from engine.model_loader import default_model_path

    path = default_model_path()
    kept = gguf_reader.read_gguf(path, keep_quantized=True)
    assert weight_format(kept.weights) == "Q4_1+Q8_0"
    assert weight_nbytes(kept.weights) <= 1.1 * path.stat().st_size    # scales and biases stay float16
    floats = gguf_reader.read_gguf(path)
    for name in ("model.embed_tokens.weight", "model.layers.3.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight"):
        np.testing.assert_array_equal(kept.weights[name].dequantize(), floats.weights[name], err_msg=name)
