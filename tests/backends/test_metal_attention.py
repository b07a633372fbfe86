"""The metal backend's paged cache write, paged gather + attention and RoPE against the torch references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")

from backends.cpu.attention import paged_attention_ref, write_kv_cache_ref  # noqa: E402
from backends.metal.attention import (  # noqa: E402
    MetalAttention,
    block_slots,
    build_attention_metadata,
    gather_kv,
    paged_attention,
    write_kv_cache,
)
from backends.metal.model import apply_rope as mlx_apply_rope, rope_inv_freq  # noqa: E402
from backends.torch_model.rope import apply_rope, compute_inv_freq, rope_cos_sin  # noqa: E402
from model.config import ModelConfig  # noqa: E402

NUM_BLOCKS, BLOCK_SIZE, H, HKV, D = 12, 4, 6, 2, 16


def to_mx(t: torch.Tensor):
    return mx.array(t.float().numpy())


def to_np(a) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def random_cache(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, BLOCK_SIZE, HKV, D)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_cache_write_equals_the_reference():
    k_ref, v_ref = random_cache()
    k_mx, v_mx = to_mx(k_ref), to_mx(v_ref)
    g = torch.Generator().manual_seed(1)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=g)[:17]
    k, v = torch.randn(17, HKV, D, generator=g), torch.randn(17, HKV, D, generator=g)
    write_kv_cache_ref(k_ref, v_ref, k, v, slots)
    k_new, v_new = write_kv_cache(k_mx, v_mx, to_mx(k), to_mx(v), slots.tolist())
    np.testing.assert_array_equal(to_np(k_new), k_ref.numpy())
    np.testing.assert_array_equal(to_np(v_new), v_ref.numpy())
    assert k_new.shape == (NUM_BLOCKS, BLOCK_SIZE, HKV, D)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cache_write_casts_to_the_cache_dtype(dtype):
    cache = mx.zeros((NUM_BLOCKS, BLOCK_SIZE, HKV, D), dtype=getattr(mx, dtype))
    k = mx.random.normal((3, HKV, D))
    k_new, _ = write_kv_cache(cache, cache, k, k, [5, 0, 47])
    assert k_new.dtype == getattr(mx, dtype)
    flat = to_np(k_new.reshape(-1, HKV, D))
    np.testing.assert_allclose(flat[[5, 0, 47]], to_np(k), rtol=1e-2, atol=1e-2)
    assert not flat[1:5].any()


def test_gather_reads_blocks_in_block_table_order():
    k_ref, _ = random_cache()
    table = [7, 2, 9]
    gathered = gather_kv(to_mx(k_ref), mx.array(block_slots(table, BLOCK_SIZE)))   # [Hkv, 12, D]
    expected = k_ref[table].reshape(-1, HKV, D).transpose(0, 1)            # [Hkv, 12, D]
    np.testing.assert_array_equal(to_np(gathered), expected.numpy())


# (context_len, q_len, block table): decodes, a prefill from scratch, chunks after a cached prefix
REQUESTS = [
    (9, 1, [3, 7, 1]),
    (5, 5, [4, 0]),
    (14, 6, [10, 11, 2, 6]),
    (1, 1, [5]),
    (16, 1, [8, 9, 0, 1]),
    (7, 3, [2, 3]),
]


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-5), ("float16", 5e-3), ("bfloat16", 3e-2)])
def test_paged_attention_equals_the_reference(dtype, tol):
    k_ref, v_ref = random_cache(2)
    g = torch.Generator().manual_seed(3)
    starts = np.cumsum([0] + [q for _, q, _ in REQUESTS]).tolist()
    q = torch.randn(starts[-1], H, D, generator=g)
    lens = [c for c, _, _ in REQUESTS]
    tables = [t for _, _, t in REQUESTS]
    expected = paged_attention_ref(q, k_ref, v_ref, tables, lens, starts, scale=D ** -0.5)
    cast = getattr(mx, dtype)
    out = paged_attention(to_mx(q).astype(cast), to_mx(k_ref).astype(cast), to_mx(v_ref).astype(cast),
                          tables, lens, starts, scale=D ** -0.5)
    assert out.shape == (starts[-1], H, D) and out.dtype == cast
    np.testing.assert_allclose(to_np(out), expected.numpy(), rtol=tol, atol=tol)


def test_one_step_writes_before_any_request_attends():
    """A step whose second request reads the blocks its first one writes (shared prefix) equals
    writing everything with the reference and then attending with the reference."""
    k_cache, v_cache = random_cache(4)
    g = torch.Generator().manual_seed(5)
    # r0: prefill of 8 tokens into blocks [3, 6]; r1: shares block 3 (its first 4 tokens) and
    # computes 3 more tokens into block 9 after a cached prefix of 4; r2: decode at position 5.
    query_lens, num_computed, tables = [8, 3, 1], [0, 4, 5], [[3, 6], [3, 9], [1, 2]]
    slots = [3 * 4 + i for i in range(4)] + [6 * 4 + i for i in range(4)] + [9 * 4 + i for i in range(3)] + [2 * 4 + 1]
    t = sum(query_lens)
    q, k, v = (torch.randn(t, n, D, generator=g) for n in (H, HKV, HKV))
    k_mx, v_mx = to_mx(k_cache), to_mx(v_cache)
    write_kv_cache_ref(k_cache, v_cache, k, v, slots)
    starts = np.cumsum([0] + query_lens).tolist()
    lens = [n + c for n, c in zip(query_lens, num_computed)]
    expected = paged_attention_ref(q, k_cache, v_cache, tables, lens, starts, scale=D ** -0.5)

    meta = build_attention_metadata(query_lens, num_computed, tables, slots, BLOCK_SIZE)
    out, (k_new, v_new) = MetalAttention(H, HKV, D).forward(to_mx(q), to_mx(k), to_mx(v), (k_mx, v_mx), meta)
    np.testing.assert_allclose(to_np(out), expected.numpy(), rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(to_np(k_new), k_cache.numpy())
    np.testing.assert_array_equal(to_np(v_new), v_cache.numpy())
    assert meta.restore_order is not None                                  # decode first, then the prefills


def test_metadata_rejects_a_block_table_too_short():
    with pytest.raises(ValueError, match="cannot hold"):
        build_attention_metadata([3], [6], [[0, 1]], [0, 1, 2], BLOCK_SIZE)
    with pytest.raises(ValueError, match="slot_mapping"):
        build_attention_metadata([2], [0], [[0]], [0], BLOCK_SIZE)


@pytest.mark.parametrize("rope_scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rope_matches_the_torch_model(rope_scaling):
    config = ModelConfig("llama", 100, 64, 128, 1, 4, 2, 32, 4096, rope_theta=50000.0, rope_scaling=rope_scaling)
    np.testing.assert_allclose(rope_inv_freq(config), compute_inv_freq(config).numpy(), rtol=1e-6)
    positions = torch.tensor([0, 3, 17, 200, 1500, 4000])
    x = torch.randn(6, 3, 32, generator=torch.Generator().manual_seed(6))
    expected = apply_rope(x, *rope_cos_sin(compute_inv_freq(config), positions, torch.float32))
    periods = mx.array(1.0 / rope_inv_freq(config))
    out = mlx_apply_rope(to_mx(x), mx.array(positions.numpy().astype(np.int32)), periods)
    # float32 angles of position 4000 are only good to ~2e-4 (one ulp), in either implementation
    np.testing.assert_allclose(to_np(out), expected.numpy(), rtol=1e-4, atol=3e-4)
    np.testing.assert_allclose(to_np(out)[:4], expected.numpy()[:4], rtol=1e-5, atol=1e-5)


def test_unsupported_rope_type_is_a_clear_error():
    config = ModelConfig("llama", 100, 64, 128, 1, 4, 2, 16, 512, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="yarn"):
        rope_inv_freq(config)
