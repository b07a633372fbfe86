"""Sliding-window and soft-capped paged attention on cpu (torch and native kernel) and metal, against the loop reference.

The batch mixes decodes at contexts shorter than, equal to and longer than
the window, a fresh prefill longer than the window and a chunk after a cached
prefix that starts inside the window, over shuffled blocks of 4 (so a window
of 6 starts mid-block). ``paged_attention_ref`` with ``window``/``softcap``
is the oracle (it is itself checked against a dense masked softmax).
"""

from __future__ import annotations

import pytest
import torch

from backends.cpu.attention import CPUAttention, paged_attention_ref, write_kv_cache_ref
from model.config import LayerAttention

H, HKV, D, BS, NUM_BLOCKS = 4, 2, 16, 4, 64
WINDOW = 6
# (num_computed, num_new): decodes at context 3, 6, 7, 17; a 13-token prefill; a 5-token chunk after 9 cached
MIXED = [(2, 1), (5, 1), (0, 13), (6, 1), (9, 5), (16, 1)]
LAYERS = {
    "window": LayerAttention(D ** -0.5, window=WINDOW),
    "softcap": LayerAttention(0.3, softcap=2.0),
    "window+softcap": LayerAttention(0.3, window=WINDOW, softcap=2.0),
}


def batch(seed: int = 0):
    """q/k/v of the new tokens, caches with random K/V at cached positions, shuffled tables, slots."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    k_cache = torch.randn(NUM_BLOCKS, BS, HKV, D, generator=g)
    v_cache = torch.randn(NUM_BLOCKS, BS, HKV, D, generator=g)
    tables, slots = [], []
    for num_computed, num_new in MIXED:
        table = [perm.pop() for _ in range(-(-(num_computed + num_new) // BS))]
        tables.append(table)
        slots += [table[p // BS] * BS + p % BS for p in range(num_computed, num_computed + num_new)]
    t = sum(n for _, n in MIXED)
    q, k, v = torch.randn(t, H, D, generator=g), torch.randn(t, HKV, D, generator=g), torch.randn(t, HKV, D, generator=g)
    return q, k, v, k_cache, v_cache, tables, slots


def starts_and_lens():
    starts = [0]
    for _, n in MIXED:
        starts.append(starts[-1] + n)
    return starts, [c + n for c, n in MIXED]


def reference(layer: LayerAttention):
    q, k, v, k_cache, v_cache, tables, slots = batch()
    write_kv_cache_ref(k_cache, v_cache, k, v, slots)
    starts, lens = starts_and_lens()
    return paged_attention_ref(q, k_cache, v_cache, tables, lens, starts, layer.scale, layer.window, layer.softcap)


def test_the_reference_is_a_masked_softmax():
    """One decode over 10 positions, window 4, cap 2: the reference equals the dense formula."""
    g = torch.Generator().manual_seed(3)
    k_cache, v_cache = torch.randn(3, BS, 1, D, generator=g), torch.randn(3, BS, 1, D, generator=g)
    q = torch.randn(1, 1, D, generator=g)
    out = paged_attention_ref(q, k_cache, v_cache, [[2, 0, 1]], [10], [0, 1], 0.5, window=4, softcap=2.0)
    keys = torch.cat([k_cache[b] for b in (2, 0, 1)])[6:10, 0]                  # positions 6..9
    values = torch.cat([v_cache[b] for b in (2, 0, 1)])[6:10, 0]
    scores = torch.tanh(keys @ q[0, 0] * 0.5 / 2.0) * 2.0
    torch.testing.assert_close(out[0, 0], torch.softmax(scores, 0) @ values)


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_cpu_attention(name, native):
    layer = LAYERS[name]
    q, k, v, k_cache, v_cache, tables, slots = batch()
    attention = CPUAttention(H, HKV, D, use_native_kernel=native, max_gather_tokens=16)
    if native:
        assert attention.decode_kernel is not None, "the native decode kernel did not build (see the log)"
    meta = attention.build_metadata([n for _, n in MIXED], [c for c, _ in MIXED], tables, slots, BS)
    out = attention.forward(0, q, k, v, (k_cache, v_cache), meta, layer)
    torch.testing.assert_close(out, reference(layer), atol=2e-5, rtol=2e-5)
    if layer.window and not native:
        windowed = meta.windowed(WINDOW)
        # a decode at context 17 gathers from the window's first block on: blocks 2..4, not 0..4
        assert max(g.num_blocks for g in windowed.decode_groups) <= -(-WINDOW // BS) + 1
        assert all(chunk.key_start > 0 for chunk in windowed.prefills if chunk.query_start >= 13 + 3)


def test_native_kernel_reads_only_the_window():
    """Blocks before the window hold NaN: the kernel (and the torch path) must never read them."""
    from backends.cpu.native import decode_attention

    kernel = decode_attention()
    assert kernel is not None, "the native decode kernel did not build (see the log)"
    g = torch.Generator().manual_seed(4)
    k_cache, v_cache = torch.randn(8, BS, HKV, D, generator=g), torch.randn(8, BS, HKV, D, generator=g)
    k_cache[[5, 1]] = float("nan")                                            # positions 0..7 of the request
    v_cache[[5, 1]] = float("nan")
    tables = torch.tensor([[5, 1, 6, 2, 7]], dtype=torch.int32)               # context 18: window 6 -> 12..17
    q = torch.randn(1, H, D, generator=g)
    out = kernel(q, k_cache, v_cache, tables, torch.tensor([18], dtype=torch.int32), 0.25, window=WINDOW)
    ref = paged_attention_ref(q, k_cache, v_cache, tables, [18], [0, 1], 0.25, window=WINDOW)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", list(LAYERS))
def test_metal_attention(name):
    mx = pytest.importorskip("mlx.core")
    import numpy as np

    from backends.metal.attention import paged_attention as mlx_paged_attention

    layer = LAYERS[name]
    q, k, v, k_cache, v_cache, tables, slots = batch()
    write_kv_cache_ref(k_cache, v_cache, k, v, slots)
    starts, lens = starts_and_lens()
    out = mlx_paged_attention(mx.array(q.numpy()), mx.array(k_cache.numpy()), mx.array(v_cache.numpy()), tables,
                              lens, starts, layer.scale, layer.window, layer.softcap)
    torch.testing.assert_close(torch.from_numpy(np.array(out)), reference(layer), atol=2e-5, rtol=2e-5)
