import pytest

from scheduler.block_pool import BlockPool


def test_allocates_lowest_ids_first_and_runs_out_without_raising():
    pool = BlockPool(4)
    assert [b.block_id for b in pool.allocate(3)] == [0, 1, 2]
    assert pool.allocate(2) is None
    assert pool.num_free_blocks == 1


def test_double_free_raises():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([b])


def test_unhashed_blocks_are_reused_before_cached_ones_and_cached_ones_lru():
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    pool.cache_block(blocks[0], b"h0")
    pool.cache_block(blocks[2], b"h2")
    # Free in the order 2, 0, 3, 1: cached LRU order is 2 then 0; unhashed 3 then 1.
    pool.free([blocks[2], blocks[0], blocks[3], blocks[1]])
    got = [b.block_id for b in pool.allocate(4)]
    assert got == [3, 1, 2, 0]
    assert pool.num_cached_blocks == 0 and pool.num_evictions == 2


def test_touch_revives_a_free_cached_block():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.cache_block(b, b"h")
    pool.free([b])
    assert pool.get_cached_block(b"h") is b
    pool.touch([b])
    assert b.ref_cnt == 1 and pool.num_free_blocks == 1
    assert [x.block_id for x in pool.allocate(1)] == [1]


def test_duplicate_content_is_not_registered_twice():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, b"same")
    assert not pool.cache_block(b, b"same")
    assert b.block_hash is None


def test_reset_prefix_cache_evicts_only_free_blocks():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"a")
    pool.cache_block(b, b"b")
    pool.free([a])
    assert pool.reset_prefix_cache() == 1
    assert pool.get_cached_block(b"a") is None and pool.get_cached_block(b"b") is b
