"""Engine options on the command line, declared once, and the backend options they become.

``EngineArgs.add_cli_args`` / ``from_cli_args`` / ``to_cli_flags`` round
trips; every command that builds an engine parses the same flags the same
way (``--kv-cache-memory 2GiB`` in ``bench`` as in ``serve``); ``dtype="auto"``
resolves in the backend's factory; the registry loads no device framework
before one is selected.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from backends.base import Backend, BackendOptions
from backends.registry import BACKEND_NAMES, create_backend
from cli.main import build_parser
from engine.args import DTYPES, EngineArgs, parse_bytes
from model.config import ModelConfig
from model.weights.canonical import expected_shapes

ROOT = Path(__file__).resolve().parents[2]

NON_DEFAULT = EngineArgs(model="m.gguf", backend="cpu", dtype="bfloat16", kv_cache_memory=3 * 2**30,
                         num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=512, max_model_len=1024,
                         block_size=32, seed=7, enable_prefix_caching=False, max_queue=4, max_prompt_tokens=100,
                         num_threads=2, tensor_parallel_size=3, gpu_memory_utilization=0.5,
                         cuda_graph_mode="piecewise", scheduling_policy="priority", default_time_limit_ms=5000,
                         quantization="none", async_scheduling=False)


def _parser(exclude=()) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    EngineArgs.add_cli_args(p, exclude=exclude)
    return p


def test_every_option_has_a_flag_and_the_defaults_are_the_fields():
    args = EngineArgs.from_cli_args(_parser().parse_args([]))
    assert args == EngineArgs(max_queue=1024)         # the server's queue bound; the offline API has none
    assert args.dtype == "auto" and EngineArgs().dtype == "auto"
    assert all(getattr(NON_DEFAULT, f) != getattr(EngineArgs(), f) for f in EngineArgs.field_names())


def test_options_render_as_flags_and_parse_back():
    flags = NON_DEFAULT.to_cli_flags()
    assert "--no-enable-prefix-caching" in flags and flags[flags.index("--dtype") + 1] == "bfloat16"
    assert "--no-async-scheduling" in flags
    assert EngineArgs.from_cli_args(_parser().parse_args(flags)) == NON_DEFAULT
    assert EngineArgs.from_cli_args(build_parser().parse_args(["serve", *flags])) == NON_DEFAULT
    assert EngineArgs(max_queue=1024).to_cli_flags() == []          # nothing to say at the defaults


def test_excluded_options_keep_the_command_s_own_flag():
    p = _parser(exclude=("seed",))
    p.add_argument("--seed", type=int, default=0, help="the dataset's seed")
    args = p.parse_args(["--seed", "5", "--max-num-seqs", "4"])
    assert EngineArgs.from_cli_args(args).seed == 5                   # read from the namespace all the same
    assert EngineArgs.from_cli_args(args).to_cli_flags(exclude=("seed",)) == ["--max-num-seqs", "4"]
    with pytest.raises(ValueError, match="not EngineArgs fields: sede"):
        _parser(exclude=("sede",))


@pytest.mark.parametrize("command", [["serve"], ["bench", "offline"], ["bench", "serve"]])
def test_every_engine_command_parses_sizes_alike(command):
    args = build_parser().parse_args([*command, "--kv-cache-memory", "2GiB", "--dtype", "float16",
                                      "--no-enable-prefix-caching", "--gpu-memory-utilization", "0.8"])
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args.kv_cache_memory == 2 * 2**30 and engine_args.dtype == "float16"
    assert engine_args.enable_prefix_caching is False and engine_args.gpu_memory_utilization == 0.8


def test_a_launched_server_gets_the_bench_s_engine_flags():
    from bench.launch import serve_flags

    args = build_parser().parse_args(["bench", "serve", "--launch", "--kv-cache-memory", "512MiB", "--seed", "9",
                                      "--backend", "cpu", "--max-queue", "16"])
    assert serve_flags(args) == ["--backend", "cpu", "--kv-cache-memory", str(512 * 2**20), "--max-queue", "16"]


def test_parse_bytes_units():
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30) and parse_bytes("2kB") == 2000 and parse_bytes("7") == 7
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes("2 parsecs")


def test_bad_values_are_value_errors():
    with pytest.raises(ValueError, match="dtype"):
        EngineArgs(dtype="int8")
    with pytest.raises(ValueError, match="backend"):
        EngineArgs(backend="tpu")
    with pytest.raises(ValueError, match="cuda_graph_mode"):
        EngineArgs(cuda_graph_mode="sometimes")
    with pytest.raises(ValueError, match="dtype"):
        BackendOptions(dtype="float64")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        BackendOptions(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="eos_token_ids"):
        BackendOptions(eos_token_ids=[2])
    assert DTYPES == ("auto", "float32", "bfloat16", "float16") and BACKEND_NAMES == ("auto", "cpu", "cuda", "metal")


# -- the registry and dtype="auto" ------------------------------------------------------

TINY = ModelConfig("llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64)


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.normal(0, 0.1, s).astype(np.float32) for n, s in expected_shapes(TINY).items()}


@pytest.mark.parametrize(("name", "auto_dtype", "explicit_dtype"),
                         [("cpu", "float32", "bfloat16"), ("metal", "bfloat16", "float32")])
def test_auto_dtype_is_float32_on_cpu_bfloat16_on_metal_and_explicit_dtypes_stay(name, auto_dtype, explicit_dtype):
    if name == "metal":
        pytest.importorskip("mlx.core")
    auto = create_backend(name, TINY, _weights(), BackendOptions(num_threads=1))
    explicit = create_backend(name, TINY, _weights(), BackendOptions(dtype=explicit_dtype, num_threads=1))
    try:
        assert isinstance(auto, Backend) and auto.name == name
        assert (auto.dtype, explicit.dtype) == (auto_dtype, explicit_dtype)
        half, full = (explicit, auto) if auto_dtype == "float32" else (auto, explicit)
        assert half.kv_block_bytes(16) == full.kv_block_bytes(16) // 2
    finally:
        auto.shutdown()
        explicit.shutdown()


def test_auto_dtype_on_cuda_is_bfloat16_where_the_gpu_has_it():
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from backends.cuda.backend import default_dtype

    if not torch.cuda.is_available():
        assert default_dtype() == "float32"                          # the cuda backend run on the CPU (tests)
        return
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert default_dtype() == ("bfloat16" if native else "float16")
    backend = create_backend("cuda", TINY, _weights(), BackendOptions(cuda_graph_mode="none"))
    try:
        assert backend.dtype == default_dtype()
    finally:
        backend.shutdown()


def test_optional_backend_members_have_defaults():
    backend = create_backend("cpu", TINY, _weights(), BackendOptions(num_threads=1))
    try:
        assert backend.profile_kv_cache_memory(16) is None          # the engine's default size then
        assert backend.check_health() is None                      # healthy
    finally:
        backend.shutdown()

    class Partial(Backend):
        def kv_block_bytes(self, block_size: int) -> int:
            return block_size

    with pytest.raises(TypeError, match="abstract"):
        Partial()


def test_the_registry_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="backend must be one of"):
        create_backend("tpu", TINY, {})
    with pytest.raises(ValueError, match="resolve"):
        create_backend("auto", TINY, {})
    with pytest.raises(ValueError, match="tensor parallelism runs on the cpu backend"):
        create_backend("cuda", TINY, {}, BackendOptions(tensor_parallel_size=2))


def test_the_registry_imports_no_device_framework_until_one_is_selected():
    code = textwrap.dedent("""
        import sys
        import backends.registry, engine.args, cli.main
        assert backends.registry.resolve_backend_name("cpu") == "cpu"
        assert not {"torch", "triton", "mlx"} & set(sys.modules), "a device framework was imported"
        from tests.engine.test_args import TINY, _weights
        backends.registry.create_backend("cpu", TINY, _weights(), backends.registry.BackendOptions(num_threads=1))
        assert "torch" in sys.modules and not {"triton", "mlx"} & set(sys.modules), "more than torch was imported"
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
