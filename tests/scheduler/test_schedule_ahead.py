"""``Scheduler.schedule_ahead``: step t+1 laid out before step t's tokens are known (async scheduling).

Accounting only, no backend: positions, slots and blocks of the ahead step, the two updates that follow, a
block boundary, the fallback when the pool is short, and that no block is hashed from a token not yet known.
"""

from __future__ import annotations

import pytest

from scheduler.output import PLACEHOLDER_TOKEN_ID, StepResult
from scheduler.request import RequestStatus
from tests.scheduler.factories import StopFields, make_request, make_scheduler

BS = 4


def _result(sched, token: int = 500) -> StepResult:
    return StepResult(sampled_token_ids={sr.request_id: token + i for i, sr in enumerate(sched.scheduled)})


def _prefilled(num_blocks: int = 20, prompt_lens=(7, 5), **params):
    """A scheduler whose first step (the prefills, every request sampling) is laid out, not updated."""
    s = make_scheduler(num_blocks, block_size=BS)
    reqs = [make_request(n, block_size=BS, request_id=f"r{i}", sampling_params=StopFields(**params))
            for i, n in enumerate(prompt_lens)]
    for r in reqs:
        s.add_request(r)
    first = s.schedule()
    assert all(sr.needs_sample for sr in first.scheduled)
    return s, reqs, first


def test_the_ahead_step_takes_the_pending_token_at_the_next_position():
    s, (a, b), first = _prefilled()
    ahead = s.schedule_ahead(first)
    assert ahead.ahead and not first.ahead
    assert [sr.request_id for sr in ahead.scheduled] == ["r0", "r1"]
    assert [sr.token_ids for sr in ahead.scheduled] == [[PLACEHOLDER_TOKEN_ID]] * 2
    assert [sr.num_computed_tokens for sr in ahead.scheduled] == [7, 5]     # the pending tokens' positions
    assert all(sr.needs_sample for sr in ahead.scheduled)
    assert [list(sr.slot_mapping) for sr in ahead.scheduled] == [
        [s.kv.block_ids("r0")[1] * BS + 3], [s.kv.block_ids("r1")[1] * BS + 1]]
    assert (a.num_computed_tokens, b.num_computed_tokens) == (0, 0)          # advanced by the updates only
    s.update_from_output(first, _result(first))
    assert (a.num_computed_tokens, a.num_tokens) == (7, 8)
    # the steady state: ahead of the ahead step, after its predecessor's update
    again = s.schedule_ahead(ahead)
    assert [sr.num_computed_tokens for sr in again.scheduled] == [8, 6]
    s.update_from_output(ahead, _result(ahead, 600))
    assert (a.num_computed_tokens, a.num_tokens) == (8, 9) and a.output_token_ids == [500, 600]
    assert (b.num_computed_tokens, b.num_tokens) == (6, 7) and b.output_token_ids == [501, 601]
    s.update_from_output(again, _result(again, 700))
    assert (a.num_computed_tokens, a.num_tokens) == (9, 10) and b.output_token_ids == [501, 601, 701]


def test_a_block_boundary_allocates_at_ahead_time_and_hashes_only_known_tokens():
    s, (a, _), first = _prefilled()                # r0: 7 tokens, blocks 0-1; its pending token fills block 1
    assert len(s.kv.block_ids("r0")) == 2 and len(a.block_hashes) == 1
    ahead = s.schedule_ahead(first)                # slot 7: still block 1
    assert len(s.kv.block_ids("r0")) == 2
    assert s.kv._num_cached["r0"] == 1             # block 1 is full once token 7 exists, but it is unknown
    s.update_from_output(first, _result(first))
    assert len(a.block_hashes) == 2                # token 7 known: block 1 has its hash now
    table = s.kv.block_ids("r0")
    again = s.schedule_ahead(ahead)                # slot 8: a new block, at ahead time
    assert len(table) == 3 and again.scheduled[0].block_table is table
    assert again.scheduled[0].slot_mapping == [table[2] * BS]
    assert s.kv._num_cached["r0"] == 2             # block 1 registered now, from the known token
    assert s.kv.pool.get_cached_block(a.block_hashes[1]).block_id == table[1]
    pending_hashes = len(a.block_hashes)
    s.update_from_output(ahead, _result(ahead))
    assert len(a.block_hashes) == pending_hashes   # 9 tokens: block 2 not full, nothing hashed


def test_a_short_pool_falls_back_changing_nothing():
    s, reqs, first = _prefilled(num_blocks=4, prompt_lens=(8, 8))       # 2 blocks each: the pool is full
    free, tables = s.kv.num_free_blocks, [list(s.kv.block_ids(r.request_id)) for r in reqs]
    assert s.schedule_ahead(first) is None                             # slot 8 needs a third block each
    assert s.kv.num_free_blocks == free == 0
    assert [list(s.kv.block_ids(r.request_id)) for r in reqs] == tables
    assert s.num_preemptions == 0 and all(r.status is RequestStatus.RUNNING for r in reqs)


def test_the_pool_is_counted_for_all_requests_before_any_allocation():
    s, reqs, first = _prefilled(num_blocks=5, prompt_lens=(8, 8))       # one free block, two needed
    assert s.schedule_ahead(first) is None
    assert s.kv.num_free_blocks == 1 and [len(s.kv.block_ids(r.request_id)) for r in reqs] == [2, 2]


def test_requests_that_end_with_the_pending_token_or_ended_since_are_left_out():
    s = make_scheduler(20, block_size=BS, max_model_len=9)
    last = make_request(5, block_size=BS, request_id="last", sampling_params=StopFields(max_tokens=1))
    two = make_request(5, block_size=BS, request_id="two", sampling_params=StopFields(max_tokens=2))
    ctx = make_request(7, block_size=BS, request_id="ctx", sampling_params=StopFields())   # 8 of 9 after one
    gone = make_request(5, block_size=BS, request_id="gone", sampling_params=StopFields())
    for r in (last, two, ctx, gone):
        s.add_request(r)
    first = s.schedule()
    s.finish_requests("gone", RequestStatus.FINISHED_ABORTED)
    ahead = s.schedule_ahead(first)
    assert [sr.request_id for sr in ahead.scheduled] == ["two", "ctx"]
    assert ahead.finished_request_ids == {"gone"}                      # reported to the backend with it
    s.update_from_output(first, _result(first))
    assert last.status is RequestStatus.FINISHED_LENGTH
    s.update_from_output(ahead, _result(ahead))
    assert two.status is RequestStatus.FINISHED_LENGTH and ctx.status is RequestStatus.FINISHED_LENGTH
    assert s.schedule_ahead(ahead) is None and s.kv.num_free_blocks == 20


def test_only_the_step_in_flight_can_be_gone_ahead_of():
    s, _, first = _prefilled()
    s.update_from_output(first, _result(first))
    with pytest.raises(ValueError, match="ahead of the step in flight"):
        s.schedule_ahead(first)                    # already updated: its tokens are known
    s2 = make_scheduler(20, block_size=BS, max_num_batched_tokens=4)
    s2.add_request(make_request(7, block_size=BS, request_id="chunked"))
    chunk = s2.schedule()                          # 4 of 7 prompt tokens: no sample
    with pytest.raises(ValueError, match="does not sample"):
        s2.schedule_ahead(chunk)


def test_a_request_ended_after_the_ahead_step_frees_its_blocks_and_its_row_is_dropped():
    s, (a, b), first = _prefilled()
    ahead = s.schedule_ahead(first)
    s.update_from_output(first, _result(first))
    s.finish_requests("r0", RequestStatus.FINISHED_STOPPED)            # e.g. a stop string in R_t
    assert "r0" not in s.kv.live_block_ids
    updated = s.update_from_output(ahead, _result(ahead))
    assert updated == [b] and a.num_tokens == 8
    s.finish_requests("r1", RequestStatus.FINISHED_ABORTED)
    assert s.kv.num_free_blocks == 20
