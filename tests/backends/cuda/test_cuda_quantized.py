"""The cuda backend on group-quantized weights: packed projections through the W4A16/W8A16 GEMM.

A tiny random Llama is quantized with the ``gguf`` package's own quantizer
(Q4_1: 4-bit codes with a float16 scale and offset per 32 values; Q8_0:
8-bit) and read into the packed layout (``model.weights.gguf_quant``).
The cuda backend keeps those weights packed (``QuantWeight``) and runs them
through ``kernels.quant_matmul``; the reference is the cpu backend (the
float32 oracle) on the same weights dequantized (``quant.dequantize_all``).
Tolerances: float32 1e-4 absolute on logits of magnitude ~3 (the kernel
dequantizes exactly as the reference does; only summation order differs);
float16 3e-2 absolute against the cuda backend on the dequantized weights in
float16 (the same weights rounded to float16 on both sides; float16
activations round at 2^-11 relative through two layers).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
gguf = pytest.importorskip("gguf")

from backends.cpu.backend import CPUBackend  # noqa: E402
from backends.cuda.backend import CUDABackend  # noqa: E402
from backends.cuda.kernels.aot import variant_key  # noqa: E402
from backends.cuda.kernels.launch import KernelLaunch  # noqa: E402
from backends.cuda.kernels.variants import KernelShapes, kernel_variants  # noqa: E402
from backends.torch_model.weights import QuantWeight, load_weights  # noqa: E402
from model.weights.gguf_quant import pack_blocks  # noqa: E402
from model.weights.quant import QuantizedTensor, dequantize_all, from_codes  # noqa: E402

from tests.backends import PagedSequence, random_tokens, step, tiny_model  # noqa: E402
from tests.backends.cuda.conftest import DEVICE  # noqa: E402

BS = 16


def quantize(weights: dict, qtype: str) -> dict:
    """Every 2-D weight of ``weights`` quantized to ``qtype`` by the gguf package, packed; the rest as is.

    A weight whose rows are not whole 32-value blocks stays float (as a GGUF writer keeps it).
    """
    out = {}
    for name, value in weights.items():
        if value.ndim == 2 and value.shape[1] % 32 == 0:
            blocks = gguf.quants.quantize(value, gguf.GGMLQuantizationType[qtype])
            out[name] = pack_blocks(blocks, qtype, value.shape)
        else:
            out[name] = value
    return out


@pytest.fixture(scope="module", params=[("Q4_1", True), ("Q8_0", False)], ids=["Q4_1-tied", "Q8_0"])
def quantized(request):
    """``(config, quantized weights, qtype)``: 4 bits with a tied (packed) LM head, 8 bits with its own."""
    qtype, tied = request.param
    _, config, weights = tiny_model("llama", seed=11, tie_word_embeddings=tied)
    return config, quantize(weights, qtype), qtype


def make(backend_cls, config, weights, **options):
    backend = backend_cls(config, weights, **options)
    if isinstance(backend, CUDABackend):
        backend.allow_tf32 = False
    backend.allocate_kv_cache(16, BS)
    return backend


def cuda_backend(config, weights, dtype="float32"):
    return make(CUDABackend, config, weights, dtype=dtype, cuda_graph_mode="none", device=DEVICE,
                max_num_batched_tokens=64, max_num_seqs=4)


def steps(config):
    """A prefill, a chunk plus a decode, then a decode-only step (M = 13, 10, 2 rows)."""
    seqs = [PagedSequence(f"q{i}", random_tokens(n, config.vocab_size, seed=90 + n), [2 * i, 2 * i + 1], BS)
            for i, n in enumerate((4, 20))]
    first = [seqs[0].chunk(4), seqs[1].chunk(9)]
    for s in seqs:
        s.token_ids.append(7)
    second = [seqs[0].chunk(1), seqs[1].chunk(9)]
    for s in seqs:
        s.token_ids.append(9)
    return [step(first, BS), step(second, BS), step([s.chunk(1) for s in seqs], BS)]


def test_projections_stay_packed_on_the_cuda_backend(quantized):
    config, weights, qtype = quantized
    model = cuda_backend(config, weights).model
    bits = 4 if qtype == "Q4_1" else 8
    layer = model.weights.layers[0]
    for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down, model.weights.embed, model.weights.lm_head):
        assert isinstance(w, QuantWeight) and w.bits == bits and w.group_size == 32
        assert w.scales.dtype == torch.float16 and w.dtype == torch.float32
    assert (model.weights.lm_head is model.weights.embed) == config.tie_word_embeddings
    assert layer.qkv.shape == ((config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim,
                               config.hidden_size)
    assert isinstance(layer.input_norm, torch.Tensor)


def test_logits_and_greedy_tokens_equal_the_cpu_backend_on_dequantized_weights(quantized):
    config, weights, _ = quantized
    cuda, cpu = cuda_backend(config, weights), make(CPUBackend, config, dequantize_all(weights), dtype="float32")
    for sched in steps(config):
        expected = cpu.compute_logits(sched, all_tokens=True)
        torch.testing.assert_close(cuda.compute_logits(sched, all_tokens=True).cpu(), expected, atol=1e-4, rtol=0)
    tokens = {}
    for name, backend in (("cuda", cuda_backend(config, weights)),
                          ("cpu", make(CPUBackend, config, dequantize_all(weights), dtype="float32"))):
        seq = PagedSequence("g", random_tokens(6, config.vocab_size, seed=5), [0, 1], BS)
        scheduled = seq.chunk(6)
        for _ in range(4):
            seq.token_ids.append(backend.execute(step([scheduled], BS)).sampled_token_ids["g"])
            scheduled = seq.chunk(1)
        tokens[name] = seq.token_ids
    assert tokens["cuda"] == tokens["cpu"]


def test_float16_logits_close_to_the_dequantized_model_in_float16(quantized):
    config, weights, _ = quantized
    sched = steps(config)[0]
    got = cuda_backend(config, weights, "float16").compute_logits(sched, all_tokens=True).cpu()
    want = cuda_backend(config, dequantize_all(weights), "float16").compute_logits(sched, all_tokens=True).cpu()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_default_load_dequantizes_exactly_as_dequantize_all():
    """The cpu path (no ``keep_quantized``): quantized inputs give the very tensors of their float32 values."""
    _, config, weights = tiny_model("llama", seed=11)
    weights = quantize(weights, "Q4_1")
    got, want = load_weights(config, weights, torch.float32), load_weights(config, dequantize_all(weights),
                                                                           torch.float32)
    for a, b in zip([got.embed, got.lm_head, *[t for layer in got.layers for t in vars(layer).values()]],
                    [want.embed, want.lm_head, *[t for layer in want.layers for t in vars(layer).values()]]):
        assert (a is None and b is None) or torch.equal(a, b)


def test_other_widths_are_relaid_and_mixed_fusions_fall_back_to_float():
    _, config, weights = tiny_model("llama", seed=2)
    rng = np.random.default_rng(0)
    hidden = config.hidden_size
    six_bit = from_codes(rng.integers(0, 64, (config.intermediate_size, hidden), dtype=np.uint8),
                         rng.uniform(0.01, 0.02, (config.intermediate_size, hidden // 64)),
                         rng.uniform(-0.3, 0.3, (config.intermediate_size, hidden // 64)), 6, 64, "mlx-affine")
    mixed = {**weights, "model.layers.0.mlp.gate_proj.weight": six_bit, "model.layers.0.mlp.up_proj.weight": six_bit,
             "model.layers.0.self_attn.q_proj.weight": six_bit.take_rows(np.arange(hidden))}
    loaded = load_weights(config, mixed, torch.float32, keep_quantized=(4, 8))
    gate_up = loaded.layers[0].gate_up
    assert isinstance(gate_up, QuantWeight) and (gate_up.bits, gate_up.group_size) == (8, 64)
    assert gate_up.scales.dtype == torch.float32                 # not held exactly by float16 or bfloat16
    packed = QuantizedTensor(gate_up.codes.numpy().view(np.uint32), gate_up.scales.numpy(), gate_up.biases.numpy(),
                             8, 64, "test")
    np.testing.assert_array_equal(packed.dequantize(), np.concatenate([six_bit.dequantize()] * 2))
    assert isinstance(loaded.layers[0].qkv, torch.Tensor)        # q packed, k and v float: all float
    torch.testing.assert_close(loaded.layers[0].qkv[:hidden], torch.from_numpy(six_bit.dequantize()[:hidden]),
                               atol=0, rtol=0)


def test_warm_up_compiles_every_variant_a_quantized_run_launches(monkeypatch, quantized):
    """Warm-up launches exactly the AOT list (``kernel_variants``: every split count, every GEMM config), and
    later steps launch nothing else."""
    config, weights, _ = quantized
    backend = make(CUDABackend, config, weights, dtype="float32", cuda_graph_mode="none", device=DEVICE,
                   max_num_batched_tokens=80, max_num_seqs=4)                 # 80: all three GEMM configs
    backend.attention.num_sms = 132                   # as on an H200: contexts of up to 256 use 1-4 KV splits
    launched: list[set] = [set()]
    run = KernelLaunch.run

    def record(self):
        launched[-1].add(variant_key(self))
        run(self)

    monkeypatch.setattr(KernelLaunch, "run", record)
    backend.warm_up()
    launched.append(set())
    for sched in steps(config):
        backend.execute(sched)
    warm, used = launched
    assert used and used <= warm, sorted(used - warm)
    qkv = backend.model.weights.layers[0].qkv
    split_counts = tuple(backend.attention.split_counts(backend.max_model_len))
    assert split_counts == (1, 2, 3, 4)
    shapes = KernelShapes(config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size,
                          torch.float32, block_size=BS, block_n=backend.attention.block_n, split_counts=split_counts,
                          quant=((qkv.bits, qkv.group_size, qkv.scales.dtype),),
                          intermediate_size=config.intermediate_size, vocab_size=config.vocab_size)
    listed = {variant_key(v.launch): v.name for v in kernel_variants(shapes)}
    assert warm == set(listed), (sorted(listed[k] for k in set(listed) - warm), sorted(warm - set(listed)))


def test_warm_up_compiles_both_moe_block_heights(monkeypatch):
    """A step of >= 1024 (token, expert) pairs uses 64-row blocks: warm-up compiles them (and the 16-row ones)."""
    from engine.model_loader import load_model
    from tests.models import family_dir

    loaded = load_model(family_dir("mixtral"))
    backend = make(CUDABackend, loaded.config, loaded.weights, dtype="float32", cuda_graph_mode="none",
                   device=DEVICE, max_num_batched_tokens=64, max_num_seqs=4)
    launched = []
    run = KernelLaunch.run

    def record(self):
        launched.append(self)
        run(self)

    monkeypatch.setattr(KernelLaunch, "run", record)
    backend.warm_up()
    moe = [launch for launch in launched if variant_key(launch)[0] == "_grouped_gemm_kernel"]
    shapes = {(launch.meta["BLOCK_M"], launch.args[1].shape) for launch in moe}               # (height, expert w)
    experts = loaded.config.num_experts
    inter, hidden = loaded.config.moe_intermediate_size, loaded.config.hidden_size
    assert shapes == {(m, s) for m in (16, 64) for s in ((experts, 2 * inter, hidden), (experts, hidden, inter))}


def test_moe_model_with_packed_attention_and_shared_expert_equals_the_cpu_backend():
    """Qwen2-MoE in Q4_0: packed qkv (with its bias), o_proj and shared expert; routed experts stay float."""
    from engine.model_loader import load_model
    from tests.models import family_dir

    loaded = load_model(family_dir("qwen2_moe"))
    config, weights = loaded.config, quantize(loaded.weights, "Q4_0")
    cuda = cuda_backend(config, weights)
    layer = cuda.model.weights.layers[0]
    assert isinstance(layer.qkv, QuantWeight) and isinstance(layer.shared_gate_up, QuantWeight)
    assert isinstance(layer.qkv_bias, torch.Tensor) and isinstance(layer.experts_gate_up, torch.Tensor)
    cpu = make(CPUBackend, config, dequantize_all(weights), dtype="float32")
    for sched in steps(config)[:2]:
        torch.testing.assert_close(cuda.compute_logits(sched, all_tokens=True).cpu(),
                                   cpu.compute_logits(sched, all_tokens=True), atol=1e-4, rtol=0)
