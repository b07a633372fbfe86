"""The fused decode-layer entry points of decode_ops.c (attn_in, mlp_block) against torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backends.torch_model.rope import apply_rope, rope_cos_sin
from tests.backends.native_kernels import ops, needs_cc, randn  # noqa: F401  (ops: a fixture)

pytestmark = needs_cc


@pytest.mark.parametrize("rows", [1, 2, 3, 8])
@pytest.mark.parametrize("with_delta,with_bias", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (32, 16)])
def test_attn_in_matches_norm_linear_rope(ops, rows, with_delta, with_bias, head_dim, rotary_dim):
    hidden, heads, kv_heads = 96, 3, 1
    n_qkv = (heads + 2 * kv_heads) * head_dim
    x, norm_w = randn(rows, hidden), randn(hidden, seed=1)
    delta = randn(rows, hidden, seed=2) if with_delta else None
    w, bias = randn(n_qkv, hidden, seed=3), randn(n_qkv, seed=4) if with_bias else None
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    cos, sin = rope_cos_sin(inv_freq, torch.arange(rows) * 37 + 5, torch.float32)          # [T, 1, R/2]
    s = x if delta is None else x + delta
    qkv_ref = F.linear(F.rms_norm(s, (hidden,), norm_w, 1e-5), w, bias)                    # [T, n_qkv]
    qk_ref = apply_rope(qkv_ref[:, : (heads + kv_heads) * head_dim].reshape(rows, heads + kv_heads, head_dim),
                        cos, sin)
    x_in = x.clone()
    res, h, qkv = torch.full_like(x, 7.0), torch.empty_like(x), torch.empty(rows, n_qkv)
    ops.attn_in(x_in, delta, norm_w, 1e-5, w, bias, cos, sin, heads + kv_heads, head_dim,
                res if delta is not None else x_in, h, qkv)
    if delta is not None:
        torch.testing.assert_close(res, s)
    else:
        assert torch.equal(x_in, x) and torch.equal(res, torch.full_like(x, 7.0))        # nothing written
    torch.testing.assert_close(qkv[:, : (heads + kv_heads) * head_dim].view_as(qk_ref), qk_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(qkv[:, (heads + kv_heads) * head_dim:], qkv_ref[:, (heads + kv_heads) * head_dim:],
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 5, 8])
def test_mlp_block_matches_oproj_norm_swiglu(ops, rows):
    hidden, attn_dim, inter = 96, 128, 200
    attn, x = randn(rows, attn_dim), randn(rows, hidden, seed=1)
    w_o, norm_w = randn(hidden, attn_dim, seed=2) / 8, randn(hidden, seed=3)
    w_gu, w_down = randn(2 * inter, hidden, seed=4) / 8, randn(hidden, inter, seed=5) / 8
    s = x + F.linear(attn, w_o)
    gate, up = F.linear(F.rms_norm(s, (hidden,), norm_w, 1e-6), w_gu).chunk(2, dim=-1)
    want = F.linear(F.silu(gate) * up, w_down)
    scratch = ops.mlp_scratch(rows, hidden, inter)
    x_in = x.clone()
    got = ops.mlp_block(attn, w_o, x_in, norm_w, 1e-6, w_gu, w_down, scratch, x_in)       # sum in place
    torch.testing.assert_close(x_in, s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert got is scratch.out
    again = ops.mlp_block(attn, w_o, x, norm_w, 1e-6, w_gu, w_down, scratch, torch.empty_like(x))  # reused
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-4)


def test_fused_entry_points_refuse_bad_inputs(ops):
    x, norm_w, w = randn(2, 64), randn(64), randn(5 * 16, 64)
    cos = sin = torch.ones(2, 1, 8)
    bufs = (torch.empty(2, 64), torch.empty(2, 64), torch.empty(2, 80))
    with pytest.raises(ValueError, match="contiguous float32"):
        ops.attn_in(x.double(), None, norm_w, 1e-5, w, None, cos, sin, 4, 16, *bufs)
    with pytest.raises(ValueError, match="inconsistent shapes for attn_in"):
        ops.attn_in(x, None, norm_w, 1e-5, w, None, cos, sin, 6, 16, *bufs)           # 6 heads of 16 > 80
    scratch = ops.mlp_scratch(2, 64, 32)
    with pytest.raises(ValueError, match="inconsistent shapes for mlp_block"):
        ops.mlp_block(randn(2, 48), randn(64, 40), x, norm_w, 1e-5, randn(64, 64), randn(64, 32), scratch, x)
    with pytest.raises(ValueError, match="contiguous float32"):
        ops.mlp_block(randn(2, 48), randn(40, 64).t(), x, norm_w, 1e-5, randn(64, 64), randn(64, 32), scratch, x)


class OldOps:
    """Fused ops without the layer entry points: the model keeps its per-op fused path."""

    def __init__(self, ops) -> None:
        self.max_rows = ops.max_rows
        self.add_rms_norm, self.rope_, self.silu_mul = ops.add_rms_norm, ops.rope_, ops.silu_mul


@pytest.mark.parametrize("variant", ["per_op", "two_ranks_like"])
def test_model_without_the_layer_fusion_still_matches(ops, variant):
    from backends.cpu.backend import CPUBackend
    from tests.backends import PagedSequence, random_tokens, step, tiny_model

    _, config, weights = tiny_model("llama", seed=5)
    fused, plain = CPUBackend(config, weights), CPUBackend(config, weights)
    for b in (fused, plain):
        b.allocate_kv_cache(16, 16)
    if variant == "per_op":
        fused.model.ops = OldOps(ops)
    else:                                                                 # an identity all-reduce: o_proj unfused
        fused.model.all_reduce = lambda t: t
    plain.model.ops, plain.model.linear = None, F.linear
    prompts = [random_tokens(n, config.vocab_size, seed=n) for n in (9, 21)]
    seqs = {name: [PagedSequence(f"r{i}", list(p), list(range(3 * i, 3 * i + 3)), 16) for i, p in enumerate(prompts)]
            for name in ("fused", "plain")}
    for name, b in (("fused", fused), ("plain", plain)):
        b.compute_logits(step([s.chunk(len(s.token_ids) - 1) for s in seqs[name]], 16))
    for _ in range(3):
        got = fused.compute_logits(step([s.chunk(1) for s in seqs["fused"]], 16))          # [2, V]
        want = plain.compute_logits(step([s.chunk(1) for s in seqs["plain"]], 16))         # [2, V]
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        for group in seqs.values():
            for s, token in zip(group, want.argmax(-1).tolist()):
                s.token_ids.append(token)
