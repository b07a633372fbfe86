"""The native small-batch operators (decode_ops.c) against the torch expressions they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backends.cpu import native
from backends.cpu.backend import NATIVE_GEMM_MAX_ROWS, NATIVE_MAX_ROWS, cpu_linear
from backends.torch_model.rope import apply_rope, rope_cos_sin
from tests.backends.native_kernels import ops, needs_cc, randn  # noqa: F401  (ops: a fixture)

pytestmark = needs_cc


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (37, 100), (5, 3), (4099, 64)])
def test_linear_matches_torch(ops, rows, out_features, in_features):
    x, w, b = randn(rows, in_features), randn(out_features, in_features, seed=1), randn(out_features, seed=2)
    torch.testing.assert_close(ops.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    out = ops.linear(x, w, b)
    assert out.is_contiguous() and out.shape == (rows, out_features)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_weight_prefetch_changes_speed_not_results(ops):
    x, w = randn(5, 576), randn(1000, 576, seed=1)
    weights = [randn(1000, 576, seed=s) for s in range(4)] + [randn(576, 1536, seed=9)]
    choice = ops.choose_weight_prefetch(weights, passes=1)
    assert set(choice) == {"prefetch", "off_gbps", "on_gbps"} and choice["off_gbps"] > 0 and choice["on_gbps"] > 0
    try:
        ops.set_weight_prefetch(False)
        off = ops.linear(x, w)
        ops.set_weight_prefetch(True)
        assert torch.equal(ops.linear(x, w), off)
    finally:
        ops.set_weight_prefetch(bool(choice["prefetch"]))


def test_linear_reads_strided_rows_and_any_thread_count(ops):
    base = randn(3, 700)
    x = base[:, 50:626]                                      # rows of 576 floats, 700 apart
    w = randn(1000, 576, seed=1)
    ref = F.linear(x, w)
    one = ops.linear(x, w, num_threads=1)
    torch.testing.assert_close(one, ref, rtol=1e-5, atol=1e-4)
    for threads in (2, 3):                                   # each output is summed by one thread, in one order
        assert torch.equal(ops.linear(x, w, num_threads=threads), one)


def test_cpu_linear_uses_the_native_gemm_for_few_rows(ops):
    x, w = randn(NATIVE_MAX_ROWS, 64), randn(300, 64, seed=1)
    assert torch.equal(cpu_linear(x, w), ops.linear(x, w))
    assert cpu_linear(x, w).is_contiguous()
    many = randn(NATIVE_MAX_ROWS + 1, 64)
    torch.testing.assert_close(cpu_linear(many, w), F.linear(many, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows,n", [(1, 576), (3, 576), (2, 13), (130, 576)])
def test_add_rms_norm_matches_torch(ops, rows, n):
    x, delta, weight = randn(rows, n), randn(rows, n, seed=1), randn(n, seed=2)
    total, normed = ops.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(total, x + delta)
    torch.testing.assert_close(normed, F.rms_norm(x + delta, (n,), weight, 1e-5), rtol=1e-5, atol=1e-5)
    same, normed = ops.add_rms_norm(x, None, weight, 1e-6)
    assert same is x
    torch.testing.assert_close(normed, F.rms_norm(x, (n,), weight, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim,rotary_dim,tokens", [(64, 64, 4), (128, 128, 4), (64, 32, 4), (20, 12, 4),
                                                         (64, 64, 300)])              # 300: the threaded path
def test_rope_matches_apply_rope(ops, head_dim, rotary_dim, tokens):
    heads, kv_heads = 6, 2
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    positions = torch.tensor([0, 1, 77, 4000] * (tokens // 4))
    cos, sin = rope_cos_sin(inv_freq, positions, torch.float32)                            # [T, 1, R/2]
    qk = qkv[:, : (heads + kv_heads) * head_dim].reshape(tokens, heads + kv_heads, head_dim)
    expected = apply_rope(qk, cos, sin)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    ops.rope_(qkv, cos, sin, heads + kv_heads, head_dim)
    torch.testing.assert_close(qkv[:, : (heads + kv_heads) * head_dim].view_as(expected), expected,
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)                  # V is not rotated


@pytest.mark.parametrize("rows", [3, 300])                                            # 300: the threaded path
def test_silu_mul_matches_torch(ops, rows):
    gate_up = randn(rows, 2 * 1540) * 6                    # saturating gates too; 1540: a tail past the vectors
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


def test_silu_mul_is_exact_to_a_few_ulp_over_the_whole_range(ops):
    gate = torch.cat((torch.linspace(-150, 150, 300_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 87.4, -87.4,
                                                                         88.8, -88.8, float("inf")])))
    got = ops.silu_mul(torch.cat((gate, torch.ones_like(gate)))[None])[0].double()
    want = F.silu(gate.double())
    assert not got.isnan().any() and got[-1] == float("inf")
    got, want = got[:-1], want[:-1]
    # float32 eps is 1.2e-7; below ~1e-35 (gates under -85) float32 itself rounds silu to 0, as torch's does
    assert ((got - want).abs() <= 4e-7 * want.abs() + 1e-35).all()


@pytest.mark.parametrize("rows,vocab", [(1, 49152), (64, 4099), (3, 5), (2, 8), (1, 1)])
def test_argmax_matches_torch(ops, rows, vocab):
    logits = randn(rows, vocab)
    assert torch.equal(ops.argmax(logits), logits.argmax(-1))
    wide = randn(rows, vocab + 7)[:, :vocab]                                   # rows of a wider buffer
    assert torch.equal(ops.argmax(wide), wide.argmax(-1))


def test_argmax_ties_infinities_and_nans_answer_as_torch_does(ops):
    logits = randn(7, 100)
    logits[0] = -float("inf")                                                  # all -inf: the first
    logits[1] = 1.0                                                            # all equal: the first
    logits[2, [17, 60, 99]] = 50.0                                             # a tie: the lowest id
    logits[3, 99] = float("inf")                                               # in the tail past the vectors
    logits[4, [50, 70]] = float("nan")                                         # NaN wins, the first one
    logits[5, 98] = float("nan")
    logits[6, 3] = float("nan")
    assert torch.equal(ops.argmax(logits), logits.argmax(-1))


def test_the_cpu_backend_samples_greedy_rows_with_the_native_argmax(ops):
    from backends.cpu.backend import CPUBackend
    from engine.sampling_params import SamplingParams
    from tests.backends import tiny_model
    from tests.backends.test_sampler import rows

    _, config, weights = tiny_model("llama", seed=4)
    sampler = CPUBackend(config, weights).sampler
    assert sampler._fast_argmax == ops.argmax
    logits = randn(3, config.vocab_size)
    logits[1, 7] = logits[1, 9] = 99.0                                       # a tie: the lowest id
    token_ids, _ = sampler.sample_rows(logits, rows(*[SamplingParams(temperature=0.0)] * 3))
    assert token_ids == logits.argmax(-1).tolist()


def test_bad_inputs_are_refused(ops):
    x, w = randn(2, 64), randn(10, 64)
    with pytest.raises(ValueError, match="float32"):
        ops.linear(x.double(), w)
    with pytest.raises(ValueError, match=r"w must be \[out, 64\]"):
        ops.linear(x, randn(10, 63))
    with pytest.raises(ValueError, match="contiguous"):
        ops.linear(x, randn(64, 10).t())
    with pytest.raises(ValueError, match="bias"):
        ops.linear(x, w, randn(9))
    with pytest.raises(ValueError, match="delta"):
        ops.add_rms_norm(x, randn(3, 64), randn(64), 1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        ops.rope_(randn(2, 64), randn(2, 1, 16), randn(2, 1, 16), 3, 32)
    with pytest.raises(ValueError, match="2 \\* n"):
        ops.silu_mul(randn(2, 5))


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv("PAGEDGEN_CPU_KERNELS", "0")
    native.decode_ops.cache_clear()
    try:
        assert native.decode_ops() is None
        x, w = randn(1, 64), randn(10, 64)
        torch.testing.assert_close(cpu_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)   # the torch path
    finally:
        monkeypatch.undo()
        native.decode_ops.cache_clear()


class CountingOps:
    """The native ops, counting calls per operator (to show the fused path ran)."""

    def __init__(self, ops) -> None:
        self.ops, self.calls, self.max_rows = ops, {}, ops.max_rows

    def __getattr__(self, name):
        fn = getattr(self.ops, name)

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return counted


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])          # qwen2: QKV bias
def test_decode_steps_with_fused_ops_equal_the_torch_model(ops, architecture):
    from backends.cpu.backend import CPUBackend
    from tests.backends import PagedSequence, random_tokens, step, tiny_model

    _, config, weights = tiny_model(architecture, seed=4)
    fused, plain = CPUBackend(config, weights), CPUBackend(config, weights)
    for b in (fused, plain):
        b.allocate_kv_cache(16, 16)
    counting = CountingOps(ops)
    fused.model.ops = counting
    plain.model.ops, plain.model.linear = None, F.linear                 # the torch reference path
    prompts = [random_tokens(n, config.vocab_size, seed=n) for n in (19, 5, 33)]
    seqs = {name: [PagedSequence(f"r{i}", list(p), list(range(3 * i, 3 * i + 3)), 16) for i, p in enumerate(prompts)]
            for name in ("fused", "plain")}
    assert fused.model.fused_max_rows == NATIVE_GEMM_MAX_ROWS
    fused.model.fused_max_rows = ops.max_rows                             # a 54-row prefill past the limit
    got, want = (b.compute_logits(step([s.chunk(len(s.token_ids) - 1) for s in seqs[name]], 16))
                 for name, b in (("fused", fused), ("plain", plain)))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert "add_rms_norm" in counting.calls                                # prefill: the elementwise ops only
    assert not {"attn_in", "mlp_block"} & set(counting.calls)
    fused.model.fused_max_rows = NATIVE_GEMM_MAX_ROWS
    counting.calls.clear()
    for _ in range(3):
        got = fused.compute_logits(step([s.chunk(1) for s in seqs["fused"]], 16))          # [3, V]
        want = plain.compute_logits(step([s.chunk(1) for s in seqs["plain"]], 16))         # [3, V]
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        for group in seqs.values():
            for s, token in zip(group, want.argmax(-1).tolist()):
                s.token_ids.append(token)
    layers = config.num_hidden_layers                                     # two calls a layer, one final norm
    assert counting.calls == {"attn_in": 3 * layers, "mlp_block": 3 * layers, "add_rms_norm": 3, "mlp_scratch": 1}


def test_batched_steps_run_the_fused_layers_in_buffers_that_grow(ops):
    # more than max_rows rows (the batched GEMM inside attn_in / mlp_block), batch sizes up and down:
    # the buffers are views of one set per layer shape, grown to the largest step
    from backends.cpu.backend import CPUBackend
    from tests.backends import PagedSequence, random_tokens, step, tiny_model

    _, config, weights = tiny_model("llama", seed=6)
    fused, plain = CPUBackend(config, weights), CPUBackend(config, weights)
    for b in (fused, plain):
        b.allocate_kv_cache(64, 16)
    counting = CountingOps(ops)
    fused.model.ops = counting
    plain.model.ops, plain.model.linear = None, F.linear
    for rows in (12, 30, 9, 30):
        prompts = [random_tokens(3 + i % 5, config.vocab_size, seed=rows * 100 + i) for i in range(rows)]
        counting.calls.clear()
        got, want = (b.compute_logits(step([PagedSequence(f"r{i}", list(p), [2 * i, 2 * i + 1], 16).chunk(len(p))
                                            for i, p in enumerate(prompts)], 16)) for b in (fused, plain))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        assert counting.calls["attn_in"] == config.num_hidden_layers
    bases = fused.model._scratch_base
    assert len(bases) == 1 and next(iter(bases.values()))["res"].shape[0] == max(sum(3 + i % 5 for i in range(r))
                                                                                  for r in (12, 30, 9))
