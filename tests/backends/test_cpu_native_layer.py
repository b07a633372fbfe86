"""The native decode attention's cache write and the one-call decoder layer (decode_layer.c) against torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backends.cpu import native
from backends.cpu.attention import paged_attention_ref, write_kv_cache_ref
from model.config import LayerAttention
from tests.backends.native_kernels import kernel, needs_cc  # noqa: F401  (kernel: a fixture)

pytestmark = needs_cc


def decode_batch(lens, heads, kv_heads, d, bs, seed=0):
    """Caches with shuffled blocks, each request's new token at position lens[r] - 1, its K/V rows strided
    in a fused QKV buffer (as the model hands them over)."""
    g = torch.Generator().manual_seed(seed)
    counts = [-(-n // bs) for n in lens]
    perm = torch.randperm(sum(counts) + 2, generator=g).tolist()
    tables = [perm[sum(counts[:r]): sum(counts[:r + 1])] for r in range(len(lens))]
    shape = (sum(counts) + 2, bs, kv_heads, d)
    k_cache, v_cache = torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g)
    qkv = torch.randn(len(lens), (heads + 2 * kv_heads) * d, generator=g)
    q = qkv[:, : heads * d].view(-1, heads, d)
    k = qkv[:, heads * d: (heads + kv_heads) * d].view(-1, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d:].view(-1, kv_heads, d)
    slots = torch.tensor([tables[r][(n - 1) // bs] * bs + (n - 1) % bs for r, n in enumerate(lens)])
    width = max(counts)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return q, k, v, k_cache, v_cache, tables, padded, slots


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (8, 1, 128), (4, 4, 32)])
@pytest.mark.parametrize("bs", [16, 5])
@pytest.mark.parametrize("layer", [LayerAttention(0.125), LayerAttention(0.2, window=37),
                                   LayerAttention(0.125, softcap=3.0), LayerAttention(0.3, window=70, softcap=2.0)],
                         ids=["plain", "window", "softcap", "window+softcap"])
def test_write_then_attend_matches_reference(kernel, heads, kv_heads, d, bs, layer):
    lens = [1, 16, 17, 64, 65, 200, 333]                   # one block .. many, past the kernel's 64-token chunks
    q, k, v, k_cache, v_cache, tables, padded, slots = decode_batch(lens, heads, kv_heads, d, bs)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(k_ref, v_ref, k, v, slots)
    want = paged_attention_ref(q, k_ref, v_ref, tables, lens, list(range(len(lens) + 1)), layer.scale,
                               layer.window, layer.softcap)
    got = kernel(q, k_cache, v_cache, padded, torch.tensor(lens, dtype=torch.int32), layer.scale,
                 window=layer.window, softcap=layer.softcap, new_kv=(k, v, slots))
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_a_batch_of_64_spreads_over_threads_with_the_same_result(kernel, num_threads):
    lens = [(37 * r) % 300 + 1 for r in range(64)]
    q, k, v, k_cache, v_cache, tables, padded, slots = decode_batch(lens, 9, 3, 64, 16, seed=4)
    cl = torch.tensor(lens, dtype=torch.int32)
    caches = (k_cache.clone(), v_cache.clone())
    one = kernel(q, *caches, padded, cl, 0.125, num_threads=1, new_kv=(k, v, slots))
    again = kernel(q, k_cache, v_cache, padded, cl, 0.125, num_threads=num_threads, new_kv=(k, v, slots))
    assert torch.equal(one, again) and torch.equal(caches[0], k_cache)
    want = paged_attention_ref(q, k_cache, v_cache, tables, lens, list(range(65)), 0.125)
    torch.testing.assert_close(one, want, atol=3e-5, rtol=1e-5)


def test_out_of_range_indices_are_refused_before_any_write(kernel):
    q, k, v, k_cache, v_cache, _, padded, slots = decode_batch([5, 20], 4, 2, 64, 16)
    cl = torch.tensor([5, 20], dtype=torch.int32)
    before = k_cache.clone()
    bad_slots = slots.clone()
    bad_slots[1] = k_cache.shape[0] * 16
    with pytest.raises(ValueError, match="out of range"):
        kernel(q, k_cache, v_cache, padded, cl, 0.125, new_kv=(k, v, bad_slots))
    bad_table = padded.clone()
    bad_table[1, 1] = k_cache.shape[0]
    with pytest.raises(ValueError, match="out of range"):
        kernel(q, k_cache, v_cache, bad_table, cl, 0.125, new_kv=(k, v, slots))
    with pytest.raises(ValueError, match="out of range"):                       # more positions than table columns
        kernel(q, k_cache, v_cache, padded, torch.tensor([5, 40], dtype=torch.int32), 0.125)
    assert torch.equal(k_cache, before)
    with pytest.raises(ValueError, match="new k and v"):
        kernel(q, k_cache, v_cache, padded, cl, 0.125, new_kv=(k.transpose(1, 2), v, slots))


@pytest.mark.parametrize("variant", ["plain", "windows+softcaps", "qkv_bias"])
def test_one_call_layers_match_the_torch_model(kernel, variant):
    from backends.cpu.backend import CPUBackend
    from tests.backends import PagedSequence, random_tokens, step, tiny_model

    _, config, weights = tiny_model("qwen2" if variant == "qkv_bias" else "llama", seed=6)
    native_b, plain = CPUBackend(config, weights), CPUBackend(config, weights)
    assert native_b.model.decode_layers is not None
    for b in (native_b, plain):
        b.allocate_kv_cache(24, 4)                                   # blocks of 4: tables over several blocks
        if variant == "windows+softcaps":
            b.model.layer_attention = [LayerAttention(0.2, window=5 + 3 * i, softcap=2.0 + i)
                                       for i in range(config.num_hidden_layers)]
    plain.model.ops, plain.model.linear, plain.model.decode_layers = None, F.linear, None
    plain.attention.decode_kernel = None
    calls = []
    run = native_b.model.decode_layers.run
    native_b.model.decode_layers.run = lambda *a: calls.append(1) or run(*a)
    prompts = [random_tokens(n, config.vocab_size, seed=n) for n in (3, 9, 14)]
    seqs = {name: [PagedSequence(f"r{i}", list(p), list(range(7 * i, 7 * i + 7)), 4) for i, p in enumerate(prompts)]
            for name in ("native", "plain")}
    for name, b in (("native", native_b), ("plain", plain)):
        b.compute_logits(step([s.chunk(len(s.token_ids) - 1) for s in seqs[name]], 4))
    for i in range(8):
        live = slice(0, 3) if i < 5 else slice(1, 2)                 # three requests, then one alone
        got = native_b.compute_logits(step([s.chunk(1) for s in seqs["native"][live]], 4))    # [n, V]
        want = plain.compute_logits(step([s.chunk(1) for s in seqs["plain"][live]], 4))       # [n, V]
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5)
        for group in seqs.values():
            for s, token in zip(group[live], want.argmax(-1).tolist()):
                s.token_ids.append(token)
    assert len(calls) == 8 * config.num_hidden_layers                # every decode layer took the one call
    for (k_n, v_n), (k_p, v_p) in zip(native_b.kv_caches, plain.kv_caches):
        torch.testing.assert_close(k_n, k_p, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v_n, v_p, atol=1e-5, rtol=1e-5)


def test_one_call_layer_refuses_bad_inputs(kernel):
    ops = native.decode_ops()
    layers = ops.decode_layers(64, 4, 2, 16, 96, 1e-5)
    with pytest.raises(ValueError, match="decode layer inputs"):
        layers.step(2, torch.zeros(2, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int32),
                    torch.ones(2, dtype=torch.int32), 1)

    class W:                                                          # qkv of the wrong width
        input_norm, post_norm = torch.ones(64), torch.ones(64)
        qkv, qkv_bias, o_proj = torch.zeros(100, 64), None, torch.zeros(64, 64)
        gate_up, down = torch.zeros(192, 64), torch.zeros(64, 96)

    cache = torch.zeros(4, 4, 2, 16)
    with pytest.raises(ValueError, match="qkv must be"):
        layers.layer(0, W, (cache, cache.clone()), 0.25, None, None)
