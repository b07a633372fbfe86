"""CPUAttention (the fast path) against the plain-loop references.

``native`` runs decodes through the native kernel (``backends/cpu/native``),
otherwise through gathered SDPA groups; both must equal the references.
"""

from __future__ import annotations

import pytest
import torch

from backends.cpu.attention import (
    CPUAttention,
    build_attention_metadata,
    paged_attention_ref,
    write_kv_cache_ref,
)

H, HKV, D, BS = 4, 2, 16, 16
NUM_BLOCKS = 40


def make_batch(specs: list[tuple[int, int]], seed: int = 0, dtype=torch.float32):
    """Random q/k/v and a pre-filled cache for requests ``(num_computed, num_new)``.

    Block tables use shuffled, non-contiguous block ids; the cache holds
    random K/V for every cached position and garbage elsewhere.
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    k_cache = torch.randn(NUM_BLOCKS, BS, HKV, D, generator=g).to(dtype)
    v_cache = torch.randn(NUM_BLOCKS, BS, HKV, D, generator=g).to(dtype)
    tables, slots = [], []
    for num_computed, num_new in specs:
        n_blocks = -(-(num_computed + num_new) // BS)
        table = [perm.pop() for _ in range(n_blocks)]
        tables.append(table)
        slots += [table[p // BS] * BS + p % BS for p in range(num_computed, num_computed + num_new)]
    t = sum(n for _, n in specs)
    q = torch.randn(t, H, D, generator=g).to(dtype)
    k = torch.randn(t, HKV, D, generator=g).to(dtype)
    v = torch.randn(t, HKV, D, generator=g).to(dtype)
    return q, k, v, k_cache, v_cache, tables, slots


def run_both(specs, max_gather_tokens=None, dtype=torch.float32, seed=0, native=False):
    q, k, v, k_cache, v_cache, tables, slots = make_batch(specs, seed, dtype)
    attn = CPUAttention(H, HKV, D, dtype=dtype, max_gather_tokens=max_gather_tokens, use_native_kernel=native)
    if native:
        assert attn.decode_kernel is not None, "the native decode kernel did not build (see the log)"
    meta = attn.build_metadata([n for _, n in specs], [c for c, _ in specs], tables, slots, BS)
    fast_k, fast_v = k_cache.clone(), v_cache.clone()
    out = attn.forward(0, q, k, v, (fast_k, fast_v), meta)                       # [T, H, D]

    write_kv_cache_ref(k_cache, v_cache, k, v, slots)
    starts = [0]
    for _, n in specs:
        starts.append(starts[-1] + n)
    ref = paged_attention_ref(q, k_cache, v_cache, tables, [c + n for c, n in specs], starts, D ** -0.5)
    return out, ref, (fast_k, fast_v), (k_cache, v_cache), meta


# decodes at context lengths 1, 15, 16, 17, 40, one chunked prefill, one fresh prefill
MIXED = [(0, 1), (20, 13), (14, 1), (15, 1), (0, 7), (16, 1), (39, 1)]


def test_mixed_batch_matches_reference_through_the_native_kernel():
    out, ref, fast_cache, ref_cache, meta = run_both(MIXED, native=True)
    assert torch.equal(fast_cache[0], ref_cache[0]) and torch.equal(fast_cache[1], ref_cache[1])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert meta.decode_groups == []
    assert meta.native_decode.context_lens.tolist() == [1, 15, 16, 17, 40]
    assert meta.native_decode.block_tables.shape == (5, 3)


@pytest.mark.parametrize("max_gather_tokens", [None, 32, 48])
def test_mixed_batch_matches_reference(max_gather_tokens):
    out, ref, fast_cache, ref_cache, meta = run_both(MIXED, max_gather_tokens)
    assert torch.equal(fast_cache[0], ref_cache[0]) and torch.equal(fast_cache[1], ref_cache[1])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    num_decodes = sum(1 for _, n in MIXED if n == 1)
    assert sum(len(g.rows) for g in meta.decode_groups) == num_decodes
    if max_gather_tokens == 32:                      # 32 tokens = 2 blocks: short decodes pair up
        assert [len(g.rows) for g in meta.decode_groups] == [2, 1, 1, 1]


def test_single_decode_group_by_default_is_padded_to_longest():
    _, _, _, _, meta = run_both(MIXED)
    (group,) = meta.decode_groups
    assert group.num_blocks == 3                     # context 40 -> 3 blocks of 16
    assert group.mask.shape == (5, 1, 1, 48)
    assert (group.mask[:, 0, 0] == 0).sum(-1).tolist() == [1, 15, 16, 17, 40]   # sorted by length


@pytest.mark.parametrize("native", [False, True])
def test_request_reads_blocks_written_by_another_in_the_same_step(native):
    # Request a writes positions 0..15 into block 7; request b shares that block as
    # its cached prefix and decodes position 16 in the same step.
    g = torch.Generator().manual_seed(1)
    k_cache = torch.zeros(NUM_BLOCKS, BS, HKV, D)
    v_cache = torch.zeros(NUM_BLOCKS, BS, HKV, D)
    q = torch.randn(17, H, D, generator=g)
    k = torch.randn(17, HKV, D, generator=g)
    v = torch.randn(17, HKV, D, generator=g)
    tables = [[7], [7, 3]]
    slots = [7 * BS + p for p in range(16)] + [3 * BS]
    attn = CPUAttention(H, HKV, D, use_native_kernel=native)
    meta = attn.build_metadata([16, 1], [0, 16], tables, slots, BS)
    out = attn.forward(0, q, k, v, (k_cache, v_cache), meta)
    padded_tables = torch.tensor([[7, 0], [7, 3]])                  # tensors work too, padded
    ref = paged_attention_ref(q, k_cache, v_cache, padded_tables, torch.tensor([16, 17]),
                              torch.tensor([0, 16, 17]), D ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert v_cache[7].abs().sum() > 0 and torch.equal(k_cache[3, 0], k[16])


def test_long_chunk_after_prefix_attends_in_bounded_pieces(monkeypatch):
    import backends.cpu.attention as attention

    monkeypatch.setattr(attention, "MAX_MASK_ELEMENTS", 200)     # context 50 -> 4 rows per piece
    out, ref, _, _, meta = run_both([(30, 20), (3, 1)])
    assert len(meta.prefills) == 5
    assert all(p.mask.numel() <= 200 for p in meta.prefills)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_prefill_without_cache_is_causal():
    out, ref, *_ = run_both([(0, 33)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the first query sees only itself: its output is its own value vector
    _, _, v, *_ = make_batch([(0, 33)])
    torch.testing.assert_close(out[0], v[0].repeat_interleave(H // HKV, dim=0), atol=1e-6, rtol=1e-6)


def test_bfloat16_close_to_reference():
    out, ref, *_ = run_both(MIXED, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


def test_write_kv_cache_ref_places_tokens_in_their_slots():
    k_cache = torch.zeros(4, BS, HKV, D)
    v_cache = torch.zeros(4, BS, HKV, D)
    k = torch.randn(2, HKV, D)
    v = torch.randn(2, HKV, D)
    write_kv_cache_ref(k_cache, v_cache, k, v, [2 * BS + 5, 17])
    assert torch.equal(k_cache[2, 5], k[0]) and torch.equal(v_cache[1, 1], v[1])
    assert k_cache.abs().sum() == k.abs().sum()


def test_metadata_rejects_bad_input():
    with pytest.raises(ValueError, match="cannot hold"):
        build_attention_metadata([1], [16], [[0]], [16], BS)
    with pytest.raises(ValueError, match="slot_mapping"):
        build_attention_metadata([2], [0], [[0]], [0], BS)
    with pytest.raises(ValueError, match="one entry per request"):
        build_attention_metadata([1, 1], [0], [[0]], [0, 1], BS)
    with pytest.raises(ValueError):
        CPUAttention(3, 2, D)
