"""Each Triton kernel against its torch reference (interpreter on CPU, native on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from backends.cuda.kernels.merge_splits import merge_splits, merge_splits_ref  # noqa: E402
from backends.cuda.kernels.paged_attention import (  # noqa: E402
    block_shape, choose_num_splits, paged_attention, paged_attention_ref, plan_attention, plan_query_blocks)
from backends.cuda.kernels.reshape_and_cache import reshape_and_cache, reshape_and_cache_ref  # noqa: E402
from backends.cuda.kernels.rms_norm import rms_norm, rms_norm_ref  # noqa: E402
from backends.cuda.kernels.rotary import rotary_embedding, rotary_embedding_ref  # noqa: E402

from tests.backends.cuda.conftest import DEVICE, DTYPES  # noqa: E402

BS = 16
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def random_caches(num_blocks: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, BS, num_kv_heads, head_dim)
    return (torch.randn(shape, generator=g).to(DEVICE, dtype), torch.randn(shape, generator=g).to(DEVICE, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_reshape_and_cache_skips_padding(dtype, head_dim):
    num_kv_heads = 3
    g = torch.Generator().manual_seed(head_dim)
    k = torch.randn(6, num_kv_heads + 4, head_dim, generator=g).to(DEVICE, dtype)[:, 1:1 + num_kv_heads]  # strided
    v = torch.randn(6, num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    slots = torch.tensor([0, 15, -1, 16, 77, -1], dtype=torch.int32, device=DEVICE)
    caches = [torch.zeros((6, BS, num_kv_heads, head_dim), dtype=dtype, device=DEVICE) for _ in range(4)]
    reshape_and_cache(k, v, caches[0], caches[1], slots)
    reshape_and_cache_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert torch.equal(caches[0][0, 15], k[1]) and torch.equal(caches[1][4, 13], v[4])
    assert int((caches[0] != 0).any(-1).any(-1).sum()) == 4                   # 4 slots written, padding skipped


def mixed_batch(num_blocks: int, seed: int):
    """Decodes at context 1, 15, 16, 17, 40; a prefill of 20 tokens; a 7-token chunk over 18 cached tokens."""
    rng = np.random.default_rng(seed)
    blocks = rng.permutation(num_blocks).tolist()
    requests = [(1, 1), (1, 15), (1, 16), (1, 17), (20, 20), (1, 40), (7, 25)]   # (query_len, context_len)
    tables, start = [], 0
    for _, context_len in requests:
        n = -(-context_len // BS)
        tables.append(blocks[start:start + n])
        start += n
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    query_lens = [q for q, _ in requests]
    query_start_locs = torch.tensor(np.concatenate(([0], np.cumsum(query_lens))), dtype=torch.int32)
    context_lens = torch.tensor([c for _, c in requests], dtype=torch.int32)
    return query_lens, block_tables.to(DEVICE), context_lens.to(DEVICE), query_start_locs.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_group,block_n", [(1, 16), (3, 32), (8, 16)], ids=["gqa1", "gqa3", "gqa8"])
def test_paged_attention_mixed_batch(dtype, head_dim, num_group, block_n):
    num_kv_heads = 2
    query_lens, block_tables, context_lens, query_start_locs = mixed_batch(12, seed=num_group)
    k_cache, v_cache = random_caches(12, num_kv_heads, head_dim, dtype, seed=head_dim + num_group)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sum(query_lens), num_group * num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    scale = head_dim ** -0.5
    plan = plan_attention(query_lens, num_group, DEVICE, block_n=block_n, prefill_block_m=32)
    out = paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_locs, scale, plan)
    expected = paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, query_start_locs, scale)
    torch.testing.assert_close(out.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_kv_decode_equals_one_split(dtype, num_splits):
    num_kv_heads, num_group, head_dim = 2, 3, 64
    context = [1, 15, 16, 17, 70]                                                # 70: five blocks, last one partial
    tables = [list(range(sum(-(-c // BS) for c in context[:i]), sum(-(-c // BS) for c in context[:i + 1])))
              for i in range(len(context))]
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    context_lens = torch.tensor(context, dtype=torch.int32, device=DEVICE)
    query_start_locs = torch.arange(len(context) + 1, dtype=torch.int32, device=DEVICE)
    k_cache, v_cache = random_caches(10, num_kv_heads, head_dim, dtype, seed=num_splits)
    q = torch.randn(len(context), num_group * num_kv_heads, head_dim,
                    generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    plan = plan_attention([1] * len(context), num_group, DEVICE, num_splits=num_splits, block_n=16)
    out = paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_locs, 0.125, plan)
    expected = paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, query_start_locs, 0.125)
    torch.testing.assert_close(out.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_merge_splits_equals_reference():
    g = torch.Generator().manual_seed(3)
    splits, tokens, heads, head_dim = 3, 4, 2, 64
    part_out = torch.randn(splits, tokens, heads, head_dim, generator=g).to(DEVICE)
    part_lse = torch.randn(splits, tokens, heads, generator=g).to(DEVICE) * 4
    part_lse[2, 1] = float("-inf")                                               # an empty split
    query_start_locs = torch.tensor([0, 1, 4], dtype=torch.int32, device=DEVICE)
    plan = plan_attention([1, 3], 1, DEVICE, num_splits=splits)
    out = merge_splits(part_out, part_lse, torch.zeros(tokens, heads, head_dim, device=DEVICE), query_start_locs, plan)
    expected = merge_splits_ref(part_out, part_lse, torch.zeros(tokens, heads, head_dim, device=DEVICE),
                                query_start_locs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_query_block_plan():
    assert block_shape(3, 1) == (16, 5)
    assert block_shape(8, 40, prefill_block_m=64) == (64, 8)
    assert block_shape(32, 1) == (32, 1)
    request_ids, starts = plan_query_blocks(np.array([1, 12, 1, 5]), block_q=5)
    assert request_ids.tolist() == [0, 1, 1, 1, 2, 3]
    assert starts.tolist() == [0, 1, 6, 11, 13, 14]
    assert choose_num_splits(1, 8, 4096, 64, num_sms=132) == 16                  # capped at max_splits
    assert choose_num_splits(1, 8, 100, 64, num_sms=132) == 2                    # no more than key tiles
    assert choose_num_splits(64, 8, 4096, 64, num_sms=132) == 1                  # batch fills the GPU


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("hidden", [64, 96])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, hidden, with_residual):
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(5, hidden, generator=g).to(DEVICE, dtype)
    weight = (torch.rand(hidden, generator=g) + 0.5).to(DEVICE, dtype)
    residual = torch.randn(5, hidden, generator=g).to(DEVICE, dtype) if with_residual else None
    res_a = residual.clone() if with_residual else None
    res_b = residual.clone() if with_residual else None
    out = rms_norm(x, weight, 1e-5, residual=res_a)
    expected = rms_norm_ref(x, weight, 1e-5, residual=res_b)
    torch.testing.assert_close(out, expected, atol=TOL[dtype], rtol=TOL[dtype])
    if with_residual:
        torch.testing.assert_close(res_a, res_b, atol=0, rtol=0)
        torch.testing.assert_close(res_a, residual + x, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_embedding_in_place_on_a_strided_view(dtype, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    qkv = torch.randn(4, 7, head_dim, generator=g).to(DEVICE, dtype)
    positions = torch.tensor([0, 1, 17, 4000], device=DEVICE)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))).to(DEVICE)
    expected = qkv.clone()
    rotary_embedding_ref(expected[:, :5], positions, inv_freq)
    rotary_embedding(qkv[:, :5], positions, inv_freq)                             # q and k heads only
    torch.testing.assert_close(qkv, expected, atol=TOL[dtype] * 2, rtol=TOL[dtype])
    assert torch.equal(qkv[0, :5], expected[0, :5])                               # position 0: identity
