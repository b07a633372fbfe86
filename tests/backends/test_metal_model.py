"""The metal backend (MLX) against the cpu backend: greedy parity token for token in float32.

Tiny random models cover GQA, MQA, Qwen2's q/k/v biases, untied embeddings and
Llama-3 rope scaling; the default model is checked in a slow test. Batched,
chunked-prefill, preemption and prefix-cache runs must give the cpu backend's
tokens too.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("mlx.core")

from engine import LLM, SamplingParams  # noqa: E402
from scheduler.output import ScheduledRequest, SchedulerOutput  # noqa: E402
from tests.factories import make_tiny_hf_model  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = ["hello world, this is a test", "日本語 and émoji 🎉", "a b c d e f g h i j k l m n o p q r s"]


def greedy_ids(llm: LLM, prompts, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def random_prompts(n: int, seed: int = 0, max_len: int = 90) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 300, (int(torch.randint(3, max_len, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), arch="llama"))


@pytest.fixture(scope="module")
def reference(tiny_path):
    """The cpu backend's greedy tokens for 12 random prompts (the batched / chunked / preempted oracle)."""
    prompts = random_prompts(12, seed=1)
    return prompts, greedy_ids(LLM(tiny_path, backend="cpu", num_kv_blocks=512), prompts)


@pytest.mark.parametrize("arch,kwargs", [
    ("llama", dict(num_attention_heads=4, num_key_value_heads=2)),                       # GQA
    ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2)),                       # qkv bias
    ("llama", dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=4)),
    ("llama", dict(tie_word_embeddings=True, hidden_size=48, head_dim=24, num_attention_heads=4,
                   num_key_value_heads=1)),                                              # MQA, tied
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
])
def test_tiny_models_match_the_cpu_backend(tmp_path, arch, kwargs):
    path = str(make_tiny_hf_model(tmp_path, arch=arch, **kwargs))
    expected = greedy_ids(LLM(path, backend="cpu", num_kv_blocks=64), PROMPTS)
    llm = LLM(path, backend="metal", dtype="float32", num_kv_blocks=64)
    assert llm.engine.backend_name == "metal" and llm.engine.backend.name == "metal"
    assert greedy_ids(llm, PROMPTS) == expected


def test_batch_of_many_lengths_matches_the_cpu_backend(tiny_path, reference):
    prompts, expected = reference
    llm = LLM(tiny_path, backend="metal", dtype="float32", num_kv_blocks=512)
    assert greedy_ids(llm, prompts) == expected
    assert greedy_ids(llm, prompts[:2]) == expected[:2]                  # alone, again, with cached prefixes


def test_chunked_prefill_matches_the_cpu_backend(tiny_path, reference):
    prompts, expected = reference
    llm = LLM(tiny_path, backend="metal", dtype="float32", num_kv_blocks=512, max_num_batched_tokens=16)
    assert greedy_ids(llm, prompts) == expected


def test_preemption_matches_the_cpu_backend(tiny_path, reference):
    prompts, expected = reference
    tight = LLM(tiny_path, backend="metal", dtype="float32", num_kv_blocks=24, block_size=8)   # 192 slots for 12 requests
    assert greedy_ids(tight, prompts) == expected
    stats = tight.get_stats()
    assert stats.num_preemptions > 0 and stats.kv_blocks_free == 24


def test_prefix_cache_hits_match_the_cpu_backend(tiny_path):
    base = list(range(20, 52))                                            # two full blocks
    prompts = [base, base + [77], base[:-1], base + [5, 6, 7]]
    expected = greedy_ids(LLM(tiny_path, backend="cpu", num_kv_blocks=256, enable_prefix_caching=False), prompts)
    llm = LLM(tiny_path, backend="metal", dtype="float32", num_kv_blocks=256)
    llm.generate([base + [1, 2]], GREEDY)                                 # warm the cache
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert outs[1].num_cached_tokens == 32 and llm.get_stats().prefix_cache_hits > 0


def _step(block_size: int = 4) -> SchedulerOutput:
    """A mixed step: a prefill, a chunk after 6 cached tokens, and a decode."""
    p = SamplingParams(temperature=0)
    reqs = [("a", [11, 12, 13, 14, 15], 0, [0, 1]), ("b", [21, 22, 23], 6, [2, 3, 4]), ("c", [31], 9, [5, 6, 7])]
    scheduled = []
    for rid, ids, done, table in reqs:
        slots = [table[pos // block_size] * block_size + pos % block_size for pos in range(done, done + len(ids))]
        scheduled.append(ScheduledRequest(rid, ids, done, table, slots, p, needs_sample=True))
    return SchedulerOutput(scheduled=scheduled, block_size=block_size)


def test_logits_of_a_mixed_step_match_the_cpu_backend(tiny_path):
    """Same step on both backends (caches filled with the same random K/V): same logits, all tokens."""
    from backends.cpu.backend import CPUBackend
    from backends.metal.backend import MetalBackend
    from engine.model_loader import load_model

    import mlx.core as mx

    loaded = load_model(tiny_path)
    cpu = CPUBackend(loaded.config, loaded.weights)
    metal = MetalBackend(loaded.config, loaded.weights)
    for backend in (cpu, metal):
        backend.allocate_kv_cache(8, 4)
    g = torch.Generator().manual_seed(0)
    for i, (k, v) in enumerate(cpu.kv_caches):
        k.copy_(torch.randn(k.shape, generator=g))
        v.copy_(torch.randn(v.shape, generator=g))
        metal.kv_caches[i] = (mx.array(k.numpy()), mx.array(v.numpy()))
    step = _step()
    expected = cpu.compute_logits(step, all_tokens=True)
    got = metal.compute_logits(step, all_tokens=True)
    assert got.shape == tuple(expected.shape) and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), expected.numpy(), rtol=1e-4, atol=1e-4)
    for (k_ref, v_ref), (k, v) in zip(cpu.kv_caches, metal.kv_caches):
        np.testing.assert_allclose(np.array(k), k_ref.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(v), v_ref.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [("float16", 0.02), ("bfloat16", 0.15)])
def test_half_precision_logits_stay_close_to_float32(tiny_path, dtype, tol):
    from backends.metal.backend import MetalBackend
    from engine.model_loader import load_model

    loaded = load_model(tiny_path)
    logits = {}
    for name in ("float32", dtype):
        backend = MetalBackend(loaded.config, loaded.weights, dtype=name)
        backend.allocate_kv_cache(8, 4)
        logits[name] = np.array(backend.compute_logits(_step(), all_tokens=True))
        assert backend.kv_caches[0][0].dtype.size == (4 if name == "float32" else 2)
        assert backend.kv_block_bytes(4) == 2 * loaded.config.num_hidden_layers * 4 * 2 * 16 * (
            4 if name == "float32" else 2)
    scale = np.abs(logits["float32"]).max()
    assert np.abs(logits[dtype] - logits["float32"]).max() < tol * scale
    assert (logits[dtype].argmax(-1) == logits["float32"].argmax(-1)).mean() >= 0.8


def test_bad_options_are_value_errors(tiny_path):
    from backends.metal.backend import MetalBackend
    from engine.model_loader import load_model

    loaded = load_model(tiny_path)
    with pytest.raises(ValueError, match="dtype"):
        MetalBackend(loaded.config, loaded.weights, dtype="float64")
    weights = dict(loaded.weights)
    del weights["model.norm.weight"]
    with pytest.raises(ValueError, match="model.norm.weight"):
        MetalBackend(loaded.config, weights)
    backend = MetalBackend(loaded.config, loaded.weights)
    with pytest.raises(RuntimeError, match="allocate_kv_cache"):
        backend.execute(_step())
    backend.allocate_kv_cache(8, 4)
    with pytest.raises(ValueError, match="block_size"):
        backend.execute(_step(block_size=8))


def test_mlx_is_imported_only_when_the_metal_backend_is_selected():
    code = (
        "import importlib.util, platform, sys\n"
        "from backends.registry import resolve_backend_name\n"
        "import backends.cpu.backend, engine, engine.llm_engine, service.server\n"
        "auto = resolve_backend_name('auto')\n"
        "assert importlib.util.find_spec('backends.metal.backend') is not None\n"
        "assert 'mlx' not in sys.modules and 'mlx.core' not in sys.modules, 'mlx was imported'\n"
        "on_apple = platform.system() == 'Darwin' and platform.machine() == 'arm64'\n"
        "assert (auto == 'metal') == on_apple, auto\n"
        "import backends.metal.backend\n"
        "assert 'mlx.core' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_default_model_matches_the_cpu_backend():
    """Few tokens: MLX's Linux CPU build multiplies with reference BLAS (~1 GFLOP/s)."""
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = greedy_ids(LLM(backend="cpu", num_kv_blocks=16), prompts, params)
    assert greedy_ids(LLM(backend="metal", dtype="float32", num_kv_blocks=16), prompts, params) == expected
    assert all(len(ids) == 8 for ids in expected)
