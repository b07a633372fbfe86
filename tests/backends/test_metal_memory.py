"""The metal backend's memory policy: auto dtype, KV sizing from Metal's working set, MLX limits, counters,
and the in-place cache write (a step allocates no second cache)."""

from __future__ import annotations

import pytest

mx = pytest.importorskip("mlx.core")

from backends.base import BackendOptions  # noqa: E402
from backends.metal import memory  # noqa: E402
from backends.metal.backend import MetalBackend, create  # noqa: E402
from engine import SamplingParams  # noqa: E402
from engine.model_loader import load_model  # noqa: E402
from scheduler.output import ScheduledRequest, SchedulerOutput  # noqa: E402
from tests.factories import make_tiny_hf_model  # noqa: E402

GIB = 2 ** 30


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(str(make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), arch="llama")))


@pytest.fixture
def on_metal(monkeypatch):
    """Pretend MLX runs on a Metal GPU with a 16 GiB recommended working set; records the limits set."""
    calls = {"wired": [], "cache": []}
    monkeypatch.setattr(mx, "device_info", lambda *a: {"device_name": "Apple M2", memory.WORKING_SET_KEY: 16 * GIB})
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    # the spies return "the previous limit" (111, 222) as MLX does, and change nothing
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls["wired"].append(n) or 111)
    monkeypatch.setattr(mx, "set_cache_limit", lambda n: calls["cache"].append(n) or 222)
    return calls


def test_auto_dtype_is_bfloat16_and_explicit_dtypes_stay(loaded):
    auto = create(loaded.config, loaded.weights, BackendOptions())
    explicit = create(loaded.config, loaded.weights, BackendOptions(dtype="float32"))
    assert (auto.dtype, explicit.dtype) == ("bfloat16", "float32") and memory.AUTO_DTYPE == "bfloat16"
    assert auto.model.layers[0].qkv.dtype == mx.bfloat16 and explicit.model.layers[0].qkv.dtype == mx.float32


def test_no_working_set_on_the_cpu_build_leaves_the_engine_default(loaded, monkeypatch):
    monkeypatch.setattr(mx, "device_info", lambda *a: {"device_name": "AMD EPYC", "architecture": "x86_64"})
    assert MetalBackend(loaded.config, loaded.weights).profile_kv_cache_memory(16) is None


def test_kv_cache_gets_the_share_of_the_working_set_left_after_weights_and_a_step(loaded, on_metal):
    backend = create(loaded.config, loaded.weights,
                     BackendOptions(gpu_memory_utilization=0.5, max_num_batched_tokens=256, max_num_seqs=8))
    resident = mx.get_active_memory()
    got = backend.profile_kv_cache_memory(16)
    layers = loaded.config.num_hidden_layers
    reserve = memory.step_reserve_bytes(loaded.config, 256, 8, 2)
    assert reserve == backend.step_reserve > 0
    # resident memory moves a little between the two reads (other tests' arrays): allow 1 MiB
    assert abs(got - (8 * GIB - resident - reserve) * layers // (layers + 1)) < 2 ** 20
    more = create(loaded.config, loaded.weights, BackendOptions(gpu_memory_utilization=0.9)).profile_kv_cache_memory(16)
    assert more > got


def test_no_memory_left_is_a_value_error_naming_the_flags(loaded, on_metal):
    backend = create(loaded.config, loaded.weights, BackendOptions(gpu_memory_utilization=0.9))
    with pytest.raises(ValueError, match="gpu-memory-utilization"):
        memory.kv_cache_budget(GIB, 0.9, GIB, 0, 2)
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        MetalBackend(loaded.config, loaded.weights, gpu_memory_utilization=1.5)
    assert backend.profile_kv_cache_memory(16) > 0


def test_limits_are_set_at_start_up_and_restored_at_shutdown(loaded, on_metal):
    backend = create(loaded.config, loaded.weights, BackendOptions(max_num_batched_tokens=128, max_num_seqs=4))
    assert on_metal == {"wired": [], "cache": []}
    backend.allocate_kv_cache(8, 16)
    assert on_metal["wired"] == [16 * GIB] and on_metal["cache"] == [backend.step_reserve]
    assert backend.limits.wired_limit == 16 * GIB
    backend.shutdown()
    assert on_metal["wired"][1:] == [111] and on_metal["cache"][1:] == [222] and backend.limits.wired_limit is None


def test_limits_stay_unset_on_the_cpu_build(loaded, monkeypatch):
    calls = []
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n))
    backend = MetalBackend(loaded.config, loaded.weights)
    backend.allocate_kv_cache(8, 16)
    assert calls == [] and backend.limits.wired_limit is None


def test_memory_stats_report_active_and_peak(loaded):
    backend = MetalBackend(loaded.config, loaded.weights)
    backend.allocate_kv_cache(8, 16)
    stats = backend.memory_stats()
    assert set(stats) == {"active", "peak", "cache"}
    assert stats["peak"] >= stats["active"] >= backend.weight_bytes + 8 * backend.kv_block_bytes(16)
    assert backend.weight_bytes > 0


def _decode_step(block_size: int, params: SamplingParams = SamplingParams(temperature=0)) -> SchedulerOutput:
    """Two requests, one new token each, after 5 and 20 cached tokens."""
    scheduled = [ScheduledRequest(rid, [tok], done, table, None, params, True, [1, 2, 3], [tok],
                                  block_size=block_size)
                 for rid, tok, done, table in (("a", 7, 5, [3]), ("b", 9, 20, [1, 4]))]
    return SchedulerOutput(scheduled=scheduled, block_size=block_size)


def test_a_step_writes_the_cache_in_place(loaded):
    """Peak memory of a step stays far below one layer's cache: the scatter reused the cache buffers."""
    backend = MetalBackend(loaded.config, loaded.weights)
    block_size = 16
    num_blocks = (8 * 2 ** 20) // (block_size * loaded.config.num_key_value_heads * loaded.config.head_dim * 4)
    backend.allocate_kv_cache(num_blocks, block_size)                       # 8 MiB per K (and V) per layer
    one_cache = backend.kv_caches[0][0].nbytes
    assert one_cache >= 8 * 2 ** 20 - 2 ** 16
    backend.execute(_decode_step(block_size))                               # warm the buffer cache
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    result = backend.execute(_decode_step(block_size))
    mx.synchronize()
    assert set(result.sampled_token_ids) == {"a", "b"}
    assert mx.get_peak_memory() - before < one_cache // 2
    assert abs(mx.get_active_memory() - before) < one_cache // 2


def test_the_engine_sizes_the_kv_cache_from_the_working_set(tmp_path, monkeypatch):
    from engine import LLM

    path = str(make_tiny_hf_model(tmp_path, arch="llama"))
    spare = 48 * 2 ** 20
    base = mx.get_active_memory()
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: 0)
    monkeypatch.setattr(mx, "set_cache_limit", lambda n: 0)

    def device_info(*a):      # the working set leaves `spare` bytes beyond what is resident and a step's reserve
        config = llm_config[0]
        return {memory.WORKING_SET_KEY: base + spare + memory.step_reserve_bytes(config, 64, 4, 4)}

    from engine.model_loader import load_model as real_load
    llm_config = [real_load(path).config]
    monkeypatch.setattr(mx, "device_info", device_info)
    llm = LLM(path, backend="metal", dtype="float32", gpu_memory_utilization=1.0, max_num_batched_tokens=64,
              max_num_seqs=4, block_size=16)
    backend = llm.engine.backend
    kv_bytes = backend.num_blocks * backend.kv_block_bytes(16)
    layers = llm_config[0].num_hidden_layers
    assert spare // 2 < kv_bytes <= spare * layers // (layers + 1)
    assert llm.engine.scheduler.config.num_kv_blocks == backend.num_blocks


def test_the_buffer_cache_is_emptied_periodically(loaded, monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "CLEAR_CACHE_EVERY", 2)
    monkeypatch.setattr(mx, "clear_cache", lambda: calls.append(1))
    backend = MetalBackend(loaded.config, loaded.weights)
    backend.allocate_kv_cache(8, 16)
    for _ in range(5):
        backend.execute(_decode_step(16))
    assert len(calls) == 2
