"""``--quantization {auto,none}``: what each backend is handed, the packed GGUF cache, and ``weight_format``."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from backends.registry import CUDA_KEEPS_QUANTIZED, keeps_quantized
from common import envs
from engine import LLM
from engine import gguf_cache
from engine.args import EngineArgs
from engine.model_info import ModelInfo
from engine.model_loader import load_model
from model.weights.quant import QuantizedTensor, dequantize_all
from tests import factories


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDGEN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def tiny_gguf(tmp_path):
    return factories.make_tiny_gguf(tmp_path, quant="Q8_0", tie_word_embeddings=False)


def model_entries() -> list[str]:
    """The GGUF cache entries (the cpu backend caches its compiled kernels there too)."""
    return sorted(p.name for p in envs.cache_dir().iterdir() if p.name.startswith("tiny-llama"))


def test_bad_quantization_is_a_clear_error():
    with pytest.raises(ValueError, match=r"quantization must be one of auto, none .*got 'int4'"):
        EngineArgs(quantization="int4")
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(quantization="fp8")
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "int4"])


def test_the_flag_round_trips_through_the_command_line():
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli_args(parser.parse_args([])).quantization == "auto"
    args = EngineArgs.from_cli_args(parser.parse_args(["--quantization", "none"]))
    assert args.quantization == "none" and args.to_cli_flags() == ["--quantization", "none"]
    assert EngineArgs().to_cli_flags() == []


def test_backend_capabilities():
    assert keeps_quantized("metal") and not keeps_quantized("cpu")
    assert keeps_quantized("cuda") == CUDA_KEEPS_QUANTIZED
    assert not keeps_quantized("metal", tensor_parallel_size=2) and not keeps_quantized("cuda", 2)
    with pytest.raises(ValueError, match="resolve backend 'auto'"):
        keeps_quantized("auto")
    with pytest.raises(ValueError, match="backend must be one of"):
        keeps_quantized("tpu")


def test_cpu_dequantizes_under_auto(tiny_gguf):
    llm = LLM(str(tiny_gguf), backend="cpu", num_kv_blocks=16)
    assert llm.engine.weight_format == "float32"
    assert ModelInfo.of(llm.engine).weight_format == "float32"
    assert model_entries() == [gguf_cache.cache_entry_for(tiny_gguf).name]   # the float32 entry only


def test_metal_keeps_the_file_quantized_under_auto_and_not_under_none(tiny_gguf):
    pytest.importorskip("mlx.core")
    from backends.metal.weights import QuantizedWeight

    auto = LLM(str(tiny_gguf), backend="metal", dtype="float32", num_kv_blocks=16)
    assert auto.engine.weight_format == ModelInfo.of(auto.engine).weight_format == "Q8_0"
    assert isinstance(auto.engine.backend.model.layers[0].qkv, QuantizedWeight)
    none = LLM(str(tiny_gguf), backend="metal", dtype="float32", quantization="none", num_kv_blocks=16)
    assert none.engine.weight_format == "float32"
    assert none.engine.backend.model.layers[0].qkv.dtype.size == 4
    half = LLM(str(tiny_gguf), backend="metal", dtype="bfloat16", quantization="none", num_kv_blocks=16)
    assert half.engine.weight_format == ModelInfo.of(half.engine).weight_format == "bfloat16"


def test_a_float_checkpoint_reports_the_compute_dtype(tmp_path):
    path = factories.make_tiny_hf_model(tmp_path, "llama")
    llm = LLM(str(path), backend="cpu", num_kv_blocks=16)
    assert llm.engine.weight_format == "float32"


def test_the_packed_cache_entry_holds_the_quantized_weights(tiny_gguf):
    kept = load_model(tiny_gguf, keep_quantized=True)            # converts: the packed entry
    assert kept.weight_format == "Q8_0"
    entry = gguf_cache.cache_entry_for(tiny_gguf, quantized=True)
    assert entry.name.startswith("tiny-llama.Q8_0-packed-") and entry != gguf_cache.cache_entry_for(tiny_gguf)
    meta = json.loads((entry / gguf_cache.CONFIG_FILE).read_text())
    assert meta["weights"] == gguf_cache.PACKED
    again = load_model(tiny_gguf, keep_quantized=True)           # reads the entry
    floats = load_model(tiny_gguf)
    assert set(again.weights) == set(kept.weights) == set(floats.weights)
    for name, tensor in kept.weights.items():
        other = again.weights[name]
        assert type(other) is type(tensor) and isinstance(tensor, QuantizedTensor) != name.endswith("norm.weight")
        if isinstance(tensor, QuantizedTensor):
            assert (other.bits, other.group_size, other.source, other.is_exact) == \
                (tensor.bits, tensor.group_size, tensor.source, tensor.is_exact)
            for part in ("codes", "scales", "biases"):
                np.testing.assert_array_equal(getattr(other, part), getattr(tensor, part), err_msg=name)
        else:
            np.testing.assert_array_equal(other, tensor, err_msg=name)
    for name, array in dequantize_all(again.weights).items():
        np.testing.assert_array_equal(array, floats.weights[name], err_msg=name)
    assert kept.weight_bytes < floats.weight_bytes / 2.5
    assert model_entries() == sorted([entry.name, gguf_cache.cache_entry_for(tiny_gguf).name])


def test_a_truncated_packed_entry_is_rebuilt(tiny_gguf):
    load_model(tiny_gguf, keep_quantized=True)
    weights_file = gguf_cache.cache_entry_for(tiny_gguf, quantized=True) / gguf_cache.WEIGHTS_FILE
    weights_file.write_bytes(weights_file.read_bytes()[:-64])
    assert load_model(tiny_gguf, keep_quantized=True).weight_format == "Q8_0"
