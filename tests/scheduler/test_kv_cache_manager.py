from scheduler.request import hash_block_tokens

from tests.scheduler.factories import make_manager, make_request


def test_growth_at_block_boundaries():
    kv = make_manager(num_blocks=10, block_size=16)
    req = make_request(16)
    assert [b.block_id for b in kv.allocate_slots(req, 16)] == [0]
    req.num_computed_tokens = 16
    req.append_output_token(7)                      # the 17th token needs a second block
    assert [b.block_id for b in kv.allocate_slots(req, 1)] == [1]
    req.num_computed_tokens = 17
    for _ in range(15):
        req.append_output_token(7)
        assert kv.allocate_slots(req, 1) == []      # fits in block 1 up to 32 tokens
        req.num_computed_tokens += 1
    req.append_output_token(7)
    assert [b.block_id for b in kv.allocate_slots(req, 1)] == [2]
    assert kv.get_block_ids(req.request_id) == [0, 1, 2]


def test_running_out_returns_none_and_changes_nothing():
    kv = make_manager(num_blocks=3)
    a = make_request(40)
    assert kv.allocate_slots(a, 40) is not None     # 3 blocks
    b = make_request(5)
    assert kv.allocate_slots(b, 5) is None
    assert kv.get_block_ids(b.request_id) == [] and kv.num_free_blocks == 0


def test_free_returns_every_block():
    kv = make_manager(num_blocks=8)
    reqs = [make_request(n) for n in (5, 17, 33)]
    for r in reqs:
        kv.allocate_slots(r, r.num_tokens)
        r.num_computed_tokens = r.num_tokens
    assert kv.num_free_blocks == 8 - (1 + 2 + 3)
    for r in reqs:
        kv.free(r)
    assert kv.num_free_blocks == 8


def test_prefix_hit_exact_block_ids_and_last_token_always_computed():
    kv = make_manager(num_blocks=10)
    prompt = list(range(100, 148))                  # 3 full blocks
    a = make_request(token_ids=prompt)
    assert [b.block_id for b in kv.allocate_slots(a, 48)] == [0, 1, 2]
    a.num_computed_tokens = 48
    b = make_request(token_ids=prompt)
    hits, n = kv.get_computed_blocks(b)
    # All 48 tokens are cached, but the last one must be recomputed: 2 blocks hit.
    assert [h.block_id for h in hits] == [0, 1] and n == 32
    assert [x.block_id for x in kv.allocate_slots(b, 16, hits)] == [3]
    assert kv.get_block_ids(b.request_id) == [0, 1, 3]
    assert kv.prefix_cache_hits == 32 and kv.prefix_cache_queries == 48


def test_partial_hit_stops_at_first_difference():
    kv = make_manager(num_blocks=10)
    a = make_request(token_ids=list(range(48)))
    kv.allocate_slots(a, 48)
    a.num_computed_tokens = 48
    other = list(range(48))
    other[20] = 999                                 # second block differs
    b = make_request(token_ids=other + [1])
    hits, n = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0] and n == 16


def test_freed_cached_blocks_are_found_again_then_evicted_lru():
    kv = make_manager(num_blocks=4)
    a = make_request(token_ids=list(range(33)))     # 2 full blocks + 1 token
    kv.allocate_slots(a, 33)
    a.num_computed_tokens = 33
    kv.free(a)                                      # 0, 1 cached; 2 unhashed
    b = make_request(token_ids=list(range(32)) + [5, 6])
    hits, n = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1]
    c = make_request(token_ids=[9] * 40)            # needs 3 blocks: 3, 2 (unhashed) then LRU cached 1
    got = [x.block_id for x in kv.allocate_slots(c, 40)]
    assert got == [3, 2, 1]                         # a's tail block (1) was freed first: evicted first
    assert kv.pool.get_cached_block(a.block_hashes[0]) is not None
    assert kv.pool.get_cached_block(a.block_hashes[1]) is None


def test_uncomputed_blocks_lose_their_hash_on_free():
    kv = make_manager(num_blocks=4)
    a = make_request(token_ids=list(range(32)))
    kv.allocate_slots(a, 32)                        # registered, but the step never ran
    kv.free(a)
    assert kv.pool.num_cached_blocks == 0


def test_cache_salt_separates_tenants():
    kv = make_manager(num_blocks=10)
    a = make_request(token_ids=list(range(40)), cache_salt="tenant-a")
    kv.allocate_slots(a, 40)
    a.num_computed_tokens = 40
    same = make_request(token_ids=list(range(40)), cache_salt="tenant-a")
    other = make_request(token_ids=list(range(40)), cache_salt="tenant-b")
    assert kv.get_computed_blocks(same)[1] == 32
    assert kv.get_computed_blocks(other)[1] == 0


def test_block_hash_chains_over_parent():
    h1 = hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(h1, [3, 4]) != hash_block_tokens(None, [3, 4])
    assert hash_block_tokens(None, [1, 2], b"x") != h1
    assert len(h1) == 32


def test_prefix_caching_off_never_hits():
    kv = make_manager(num_blocks=10, caching=False)
    a = make_request(token_ids=list(range(40)))
    kv.allocate_slots(a, 40)
    a.num_computed_tokens = 40
    assert kv.get_computed_blocks(make_request(token_ids=list(range(40)))) == ([], 0)
