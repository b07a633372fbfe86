"""The cuda backend's model and step logic (on CPU under the interpreter), graph dispatch, KV sizing.

GPU-only tests (CUDA graphs, memory profiling) are marked ``gpu`` and skip
without CUDA.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from backends.cpu.backend import CPUBackend  # noqa: E402
from backends.cuda.backend import CUDABackend  # noqa: E402
from backends.cuda.attention import TritonAttention  # noqa: E402
from backends.cuda.graphs import (GraphDispatcher, capture_graphs, graph_batch_sizes, padded_size,  # noqa: E402
                                  piecewise_token_sizes)
from backends.cuda.memory import (MemoryProfile, allocation_bytes, graph_output_bytes, kv_block_bytes,  # noqa: E402
                                  kv_cache_bytes, num_kv_blocks)

from tests.backends import PagedSequence, random_tokens, step, tiny_model  # noqa: E402
from tests.backends.cuda.conftest import DEVICE, NATIVE  # noqa: E402

BS = 16
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not NATIVE, reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=7, num_attention_heads=4, num_key_value_heads=2)


def make(backend_cls, config, weights, **options):
    backend = backend_cls(config, weights, **options)
    if isinstance(backend, CUDABackend):
        backend.allow_tf32 = False                      # IEEE float32: compared with the cpu backend at 1e-4
    backend.allocate_kv_cache(24, BS)
    return backend


def cuda_backend(config, weights, **options):
    options = {"dtype": "float32", "cuda_graph_mode": "none", "device": DEVICE, "max_num_batched_tokens": 64,
               "max_num_seqs": 8, **options}
    # float32 parity with the cpu backend: IEEE matmuls (a GPU would otherwise use TF32), see make()
    return make(CUDABackend, config, weights, **options)


def mixed_steps(config):
    """Prefills (one chunked); decodes at 1..17 tokens of context plus the chunk's rest; a decode-only step."""
    lens = [1, 15, 16, 17, 30]
    prompts = [random_tokens(n, config.vocab_size, seed=n) for n in lens]
    tables = [[0], [1], [2, 7], [3, 4], [5, 6]]
    seqs = [PagedSequence(f"r{i}", p, t, BS) for i, (p, t) in enumerate(zip(prompts, tables))]
    first = [s.chunk(n - 1) for s, n in zip(seqs[1:4], lens[1:4])] + [seqs[4].chunk(12, needs_sample=False)]
    second = [seqs[0].chunk(1)] + [s.chunk(1) for s in seqs[1:4]] + [seqs[4].chunk(18)]
    for s in seqs:
        s.token_ids.append(3)
    third = [s.chunk(1) for s in seqs]                                          # 5 decodes: a padded graph of 8
    return [step(first, BS), step(second, BS), step(third, BS)]


@pytest.fixture(scope="module")
def eager_run(llama):
    """Logits of every token of ``mixed_steps`` on the eager cuda backend, and the backend."""
    _, config, weights = llama
    backend = cuda_backend(config, weights, dtype="float32")
    return [backend.compute_logits(sched, all_tokens=True) for sched in mixed_steps(config)], backend


def test_logits_equal_cpu_backend(llama, eager_run):
    _, config, weights = llama
    cpu = make(CPUBackend, config, weights)
    tol = 1e-4
    logits, cuda = eager_run
    for sched, got in zip(mixed_steps(config), logits):
        torch.testing.assert_close(got.cpu(), cpu.compute_logits(sched, all_tokens=True), atol=tol, rtol=0)
    torch.testing.assert_close(cuda.kv_caches[1][0].cpu(), cpu.kv_caches[1][0], atol=tol, rtol=0)


def test_greedy_generation_equals_cpu_backend(llama):
    _, config, weights = llama
    tokens = {}
    for name, backend in (("cpu", make(CPUBackend, config, weights)), ("cuda", cuda_backend(config, weights))):
        seqs = [PagedSequence(f"g{i}", random_tokens(n, config.vocab_size, seed=50 + n), [2 * i, 2 * i + 1], BS)
                for i, n in enumerate((5, 14))]
        scheduled = [s.chunk(len(s.token_ids)) for s in seqs]
        for _ in range(5):
            result = backend.execute(step(scheduled, BS))
            for s in seqs:
                s.token_ids.append(result.sampled_token_ids[s.request_id])
            scheduled = [s.chunk(1) for s in seqs]
        tokens[name] = [s.token_ids for s in seqs]
    assert tokens["cuda"] == tokens["cpu"]


def test_validation_and_sizes(llama):
    _, config, weights = llama
    with pytest.raises(ValueError, match="dtype"):
        CUDABackend(config, weights, dtype="int8", device=DEVICE, cuda_graph_mode="none")
    with pytest.raises(ValueError, match="cuda_graph_mode"):
        CUDABackend(config, weights, device=DEVICE, cuda_graph_mode="sometimes")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        CUDABackend(config, weights, device=DEVICE, cuda_graph_mode="none", gpu_memory_utilization=1.5)
    backend = CUDABackend(config, weights, dtype="float16", device=DEVICE, cuda_graph_mode="none")
    assert backend.kv_block_bytes(BS) == make(CPUBackend, config, weights).kv_block_bytes(BS) // 2
    assert backend.num_blocks_for_memory(3 * backend.kv_block_bytes(BS) + 5, BS) == 3
    with pytest.raises(RuntimeError, match="allocate_kv_cache"):
        backend.execute(step([PagedSequence("a", [1, 2], [0], BS).chunk(2)], BS))


def test_kv_sizing_arithmetic():
    gib = 1 << 30
    profile = MemoryProfile(total=100 * gib, peak_torch=20 * gib, non_torch=gib, graph_pool=gib // 2,
                            graph_overhead=gib // 100, num_graphs=20)
    # 90 - 20 - 1 - 0.5 - 0.2 GiB
    assert kv_cache_bytes(profile, 0.9) == 90 * gib - 20 * gib - gib - gib // 2 - 20 * (gib // 100)
    assert kv_cache_bytes(profile, 0.2) == 0                                   # nothing left: 0, never negative
    with pytest.raises(ValueError):
        kv_cache_bytes(profile, 0.0)
    with_outputs = MemoryProfile(total=100 * gib, peak_torch=20 * gib, non_torch=gib, graph_outputs=3 * gib)
    assert kv_cache_bytes(with_outputs, 0.9) == 90 * gib - 24 * gib                # the graphs' outputs count too
    with pytest.raises(ValueError):
        MemoryProfile(total=1, peak_torch=-1, non_torch=0)
    # Llama-3.1-8B: 32 layers, 8 KV heads of 128, bfloat16, 16-token blocks: 2 MiB per block
    assert kv_block_bytes(32, 16, 8, 128, 2) == 2 << 20
    assert num_kv_blocks(10 * (2 << 20) + 1, 2 << 20) == 10
    assert num_kv_blocks(-5, 2 << 20) == 0


def test_graph_outputs_of_every_captured_size_are_counted():
    # full graphs of a 128k vocabulary: each keeps its [B, V] float32 logits in the pool
    sizes, row = graph_batch_sizes(256), 128256 * 4
    outputs = graph_output_bytes(sizes, 256, row)
    assert outputs == sum(allocation_bytes(b * row) for b in sizes if b != 256)
    assert 1.0e9 < outputs < 1.2e9                                              # about 1.1 GB besides the largest
    assert allocation_bytes(1) == 512 and allocation_bytes(1 << 20) == 1 << 21 and allocation_bytes(3 << 20) == 4 << 20
    assert graph_output_bytes([1, 2, 4], 4, 0) == 0


def test_capture_collects_garbage_and_releases_cache_once_for_all_graphs(monkeypatch):
    import backends.cuda.graphs as graphs

    calls = {"gc": 0, "release": 0, "sync": 0}
    monkeypatch.setattr(graphs.gc, "collect", lambda: calls.__setitem__("gc", calls["gc"] + 1))
    captured = []
    stats = capture_graphs([4, 1, 16, 8], captured.append, lambda: calls.__setitem__("sync", calls["sync"] + 1),
                           lambda: 0, release_cached=lambda: calls.__setitem__("release", calls["release"] + 1))
    assert captured == [16, 8, 4, 1]                                            # largest first
    assert stats.num_graphs == 4 and sorted(stats.per_size_seconds) == [1, 4, 8, 16]
    assert calls["gc"] == 1 and calls["release"] == 1                           # once, not per graph


def test_warmup_plan_compiles_every_split_count_and_the_prefill_tile():
    attention = TritonAttention(32, 8, 128, num_sms=132, block_n=64)
    assert attention.split_counts(131072) == list(range(1, 17))
    assert attention.split_counts(100) == [1, 2]                                # no more splits than key tiles
    assert TritonAttention(32, 8, 128, num_sms=8).split_counts(131072) == [1, 2]  # 2 waves of 8 SMs
    steps = attention.warmup_metadata(131072, 16, "cpu")
    assert [m.plan.num_splits for m in steps] == list(range(1, 17)) + [1]       # build_metadata chose each itself
    assert {m.plan.block_m for m in steps[:-1]} == {16} and steps[-1].plan.block_m == 64   # decode tiles, prefill
    assert all((m.slot_mapping == -1).all() for m in steps)                     # nothing is written to the cache


def test_warm_up_runs_every_attention_variant_and_writes_nothing(llama):
    _, config, weights = llama
    backend = cuda_backend(config, weights, max_model_len=256)
    before = [k.clone() for k, _ in backend.kv_caches]
    backend.kv_caches[0][0].normal_()
    before[0] = backend.kv_caches[0][0].clone()
    backend.warm_up()
    assert all(torch.equal(k, b) for (k, _), b in zip(backend.kv_caches, before))
    assert len(backend.attention.warmup_metadata(256, BS, DEVICE)) == len(backend.attention.split_counts(256)) + 1


def test_tf32_is_allowed_for_float32_matmuls_unless_switched_off(llama):
    _, config, weights = llama
    backend = CUDABackend(config, weights, dtype="float32", device=DEVICE, cuda_graph_mode="none")
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision setting")
    saved = matmul.fp32_precision
    try:
        backend._set_matmul_precision()
        assert matmul.fp32_precision == "tf32"
        backend.allow_tf32 = False
        backend._set_matmul_precision()
        assert matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision = saved


def test_graph_sizes_and_dispatch():
    assert graph_batch_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 16))
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 32]                        # the last size holds 20
    assert graph_batch_sizes(3) == [1, 2, 4]
    pieces = piecewise_token_sizes(256, 2048)
    assert pieces[:5] == [1, 2, 4, 8, 16] and pieces[-3:] == [384, 448, 512]
    assert piecewise_token_sizes(4, 100)[-1] == 100                             # never above the token budget
    assert padded_size(5, [1, 2, 4, 8]) == 8 and padded_size(9, [1, 2, 4, 8]) is None

    full = GraphDispatcher("full", graph_batch_sizes(32), [])
    assert (full.choose(3, 3, True).kind, full.choose(3, 3, True).size) == ("full", 4)
    assert full.choose(17, 17, True).size == 32
    assert full.choose(40, 40, True).kind == "eager"                            # no graph that large
    assert full.choose(20, 2, False).kind == "eager"                            # prefill: eager in full mode
    piecewise = GraphDispatcher("piecewise", [], piecewise_token_sizes(32, 512))
    choice = piecewise.choose(70, 3, False)
    assert (choice.kind, choice.size) == ("piecewise", 80)                      # mixed steps replay too
    assert piecewise.choose(600, 3, False).kind == "eager"
    assert GraphDispatcher("none").choose(1, 1, True).kind == "eager"
    with pytest.raises(ValueError):
        GraphDispatcher("always")


@pytest.mark.parametrize("mode", ["full", "piecewise"])
def test_graph_modes_equal_eager(llama, eager_run, mode):
    """Graph replays (real CUDA graphs on a GPU, eager stand-ins on CPU) over padded static buffers."""
    _, config, weights = llama
    tol = 1e-4 if NATIVE else 1e-5                      # on a GPU, graphs split long contexts differently
    eager_logits, eager = eager_run
    graphed = cuda_backend(config, weights, dtype=eager.dtype, cuda_graph_mode=mode)
    sizes = graphed.full_sizes if mode == "full" else graphed.piecewise_sizes
    assert sizes and set(sizes) == set(graphed._full_graphs if mode == "full" else graphed._piece_graphs)
    kinds = []
    for sched, expected in zip(mixed_steps(config), eager_logits):
        r = sched.scheduled
        is_decode = max(len(x.token_ids) for x in r) == 1
        kinds.append(graphed.dispatcher.choose(sched.num_scheduled_tokens, len(r), is_decode))
        torch.testing.assert_close(graphed.compute_logits(sched, all_tokens=True).clone(), expected, atol=tol, rtol=tol)
    torch.testing.assert_close(graphed.kv_caches[0][1], eager.kv_caches[0][1], atol=tol, rtol=tol)
    if mode == "full":                                   # prefill and mixed steps eager; 5 decodes padded to 8
        assert [(k.kind, k.size) for k in kinds] == [("eager", 57), ("eager", 22), ("full", 8)]
    else:
        assert [(k.kind, k.size) for k in kinds] == [("piecewise", 64), ("piecewise", 32), ("piecewise", 8)]


@gpu
@needs_cuda
def test_no_kernel_compiles_after_start_up(llama):
    """Warm-up and capture compile every variant; steps of new batch sizes and contexts compile none."""
    from backends.cuda.kernels import merge_splits, paged_attention, reshape_and_cache, rms_norm, rotary

    kernels = [paged_attention._paged_attention_kernel, merge_splits._merge_splits_kernel,
               reshape_and_cache._reshape_and_cache_kernel, rms_norm._rms_norm_kernel, rotary._rotary_kernel]

    def compiled() -> int:
        return sum(len(entry[0]) for k in kernels for entry in k.device_caches.values())

    _, config, weights = llama
    backend = CUDABackend(config, weights, dtype="bfloat16", cuda_graph_mode="none", max_num_seqs=8,
                          max_num_batched_tokens=64, max_model_len=256)
    backend.allocate_kv_cache(24, BS)                                           # warms up
    start = compiled()
    prompt = PagedSequence("p", random_tokens(30, config.vocab_size, seed=1), [0, 1], BS)
    backend.execute(step([prompt.chunk(30)], BS))
    for batch, context in ((1, 200), (3, 40), (8, 17), (2, 129), (1, 1)):       # 1 to 4 KV splits
        seqs = [PagedSequence(f"s{batch}-{i}", random_tokens(context, config.vocab_size, seed=i),
                              list(range(-(-context // BS))), BS) for i in range(batch)]
        for s in seqs:
            s.num_computed_tokens = context - 1
        backend.execute(step([s.chunk(1) for s in seqs], BS))
    assert start > 0 and compiled() == start


@gpu
@needs_cuda
def test_memory_profile_leaves_room_on_gpu(llama):
    _, config, weights = llama
    backend = CUDABackend(config, weights, dtype="bfloat16", cuda_graph_mode="full", gpu_memory_utilization=0.5,
                          max_num_seqs=8, max_num_batched_tokens=64)
    budget = backend.profile_kv_cache_memory(BS)
    total = torch.cuda.mem_get_info()[1]
    assert 0 < budget < 0.5 * total
    backend.allocate_kv_cache(backend.num_blocks_for_memory(min(budget, 1 << 28), BS), BS)
    assert backend.capture_stats is not None and backend.capture_stats.num_graphs == len(backend.full_sizes)


def test_engine_passes_cuda_options_and_sizes_kv_from_the_profile(tmp_path, monkeypatch):
    """``LLM(backend="cuda")`` wiring, with the backend on CPU and a stubbed memory profile."""
    import backends.cuda.backend as cuda_module
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from tests.factories import make_tiny_hf_model

    seen = {}

    class ProfiledOnCPU(CUDABackend):
        def __init__(self, *args, **options):
            seen.update(options)
            super().__init__(*args, **{**options, "device": DEVICE})

        def profile_kv_cache_memory(self, block_size: int = 16) -> int:
            seen["profiled_block_size"] = block_size
            return 7 * self.kv_block_bytes(block_size) + 1

    monkeypatch.setattr(cuda_module, "CUDABackend", ProfiledOnCPU)
    llm = LLM(str(make_tiny_hf_model(tmp_path, arch="llama")), backend="cuda", cuda_graph_mode="full",
              gpu_memory_utilization=0.5, max_num_seqs=4, max_num_batched_tokens=64, block_size=BS)
    assert seen["cuda_graph_mode"] == "full" and seen["gpu_memory_utilization"] == 0.5
    assert seen["max_num_seqs"] == 4 and seen["profiled_block_size"] == BS
    assert llm.engine.backend.num_blocks == 7 and sorted(llm.engine.backend._full_graphs) == [1, 2, 4]
    outs = llm.generate(["hello world", "a b c"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]
