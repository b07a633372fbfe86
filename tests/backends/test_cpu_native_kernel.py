"""The native paged decode-attention kernel against the plain-loop reference."""

from __future__ import annotations

import pytest
import torch

from backends.cpu import native
from backends.cpu.attention import paged_attention_ref
from tests.backends.native_kernels import kernel, needs_cc  # noqa: F401  (kernel: a fixture)

pytestmark = needs_cc


def random_batch(lens, num_heads, num_kv_heads, head_dim, block_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = [-(-n // block_size) for n in lens]
    total = sum(num_blocks) + 3
    perm = torch.randperm(total, generator=g).tolist()
    tables = []
    for nb in num_blocks:
        tables.append(perm[:nb])
        del perm[:nb]
    k_cache = torch.randn(total, block_size, num_kv_heads, head_dim, generator=g) * 3   # peaked softmax too
    v_cache = torch.randn(total, block_size, num_kv_heads, head_dim, generator=g)
    q = torch.randn(len(lens), num_heads, head_dim, generator=g)
    width = max(num_blocks)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return q, k_cache, v_cache, tables, padded


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (16, 2)])   # GQA ratios 1, 3, 8
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 5])
def test_matches_reference(kernel, num_heads, num_kv_heads, head_dim, block_size):
    lens = [1, 15, 16, 17, 3 * block_size + 2, 70]
    q, k_cache, v_cache, tables, padded = random_batch(lens, num_heads, num_kv_heads, head_dim, block_size)
    scale = head_dim ** -0.5
    out = kernel(q, k_cache, v_cache, padded, torch.tensor(lens, dtype=torch.int32), scale)
    ref = paged_attention_ref(q, k_cache, v_cache, tables, lens, list(range(len(lens) + 1)), scale)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_result_does_not_depend_on_the_thread_count(kernel, num_threads):
    lens = [5, 33, 1, 64, 17]
    q, k_cache, v_cache, _, padded = random_batch(lens, 8, 2, 64, 16, seed=3)
    cl = torch.tensor(lens, dtype=torch.int32)
    one = kernel(q, k_cache, v_cache, padded, cl, 0.125, num_threads=1)
    assert torch.equal(kernel(q, k_cache, v_cache, padded, cl, 0.125, num_threads=num_threads), one)


def test_large_scores_do_not_overflow(kernel):
    q, k_cache, v_cache, tables, padded = random_batch([40], 4, 2, 64, 16, seed=1)
    q *= 200.0                                          # scores in the thousands: softmax is one-hot-ish
    out = kernel(q, k_cache, v_cache, padded, torch.tensor([40], dtype=torch.int32), 0.125)
    ref = paged_attention_ref(q, k_cache, v_cache, tables, [40], [0, 1], 0.125)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_reads_query_rows_of_a_wider_buffer(kernel):
    """q as the attention sees it in a decode step: the first heads of each row of a fused QKV buffer."""
    lens = [3, 40, 17]
    q, k_cache, v_cache, _, padded = random_batch(lens, 6, 2, 64, 16, seed=2)
    cl = torch.tensor(lens, dtype=torch.int32)
    qkv = torch.randn(3, 10 * 64)                                       # [n, (H + 2 Hkv) * D]
    qkv[:, : 6 * 64] = q.reshape(3, -1)
    strided = qkv[:, : 6 * 64].view(3, 6, 64)
    assert not strided.is_contiguous()
    out = torch.full((3, 6, 64), float("nan"))
    assert kernel(strided, k_cache, v_cache, padded, cl, 0.125, out=out) is out
    assert torch.equal(out, kernel(q, k_cache, v_cache, padded, cl, 0.125))
    with pytest.raises(ValueError, match="out must be"):
        kernel(strided, k_cache, v_cache, padded, cl, 0.125, out=torch.empty(3, 6, 32))


def test_bad_inputs_are_refused(kernel):
    q, k_cache, v_cache, _, padded = random_batch([4], 4, 2, 64, 16)
    lens = torch.tensor([4], dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        kernel(q, k_cache, v_cache, padded.long(), lens, 0.125)
    with pytest.raises(ValueError, match="float32"):
        kernel(q.double(), k_cache, v_cache, padded, lens, 0.125)
    with pytest.raises(ValueError, match="contiguous"):
        kernel(q.transpose(1, 2).contiguous().transpose(1, 2), k_cache, v_cache, padded, lens, 0.125)
    q3, k3, v3, _, p3 = random_batch([4], 4, 2, 12, 16)          # head_dim not a multiple of 8
    assert not kernel.supports(4, 2, 12, 16)
    with pytest.raises(ValueError, match="does not support"):
        kernel(q3, k3, v3, p3, lens, 0.125)


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv("PAGEDGEN_CPU_KERNELS", "0")
    native.decode_attention.cache_clear()
    try:
        assert native.decode_attention() is None
    finally:
        monkeypatch.undo()
        native.decode_attention.cache_clear()


@pytest.mark.parametrize("query_lens", [[1, 1, 1], [1, 4, 1]])        # decode-only (rows in place), mixed
def test_attention_with_the_kernel_matches_the_gather_path(kernel, query_lens):
    from backends.cpu.attention import CPUAttention

    heads, kv_heads, d, bs = 6, 2, 64, 16
    computed = [20, 3, 33]
    tables = [[0, 1], [2], [3, 4, 5]]
    slots = [tables[r][p // bs] * bs + p % bs for r, (c, n) in enumerate(zip(computed, query_lens))
             for p in range(c, c + n)]
    g = torch.Generator().manual_seed(7)
    k_cache, v_cache = torch.randn(6, bs, kv_heads, d, generator=g), torch.randn(6, bs, kv_heads, d, generator=g)
    qkv = torch.randn(len(slots), (heads + 2 * kv_heads) * d, generator=g)                  # [T, (H + 2 Hkv) * D]
    q = qkv[:, : heads * d].view(-1, heads, d)                                               # strided rows
    k = qkv[:, heads * d: (heads + kv_heads) * d].view(-1, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d:].view(-1, kv_heads, d)
    outs = []
    for use_native in (None, False):
        attention = CPUAttention(heads, kv_heads, d, use_native_kernel=use_native)
        assert (attention.decode_kernel is not None) == (use_native is None)
        meta = attention.build_metadata(query_lens, computed, tables, slots, bs)
        if use_native is None:
            assert meta.native_decode.every == (max(query_lens) == 1)                        # the in-place path
        outs.append(attention.forward(0, q, k, v, (k_cache.clone(), v_cache.clone()), meta))   # [T, H, D]
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=1e-5)
