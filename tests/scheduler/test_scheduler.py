import pytest

from scheduler.output import StepResult
from scheduler.request import RequestStatus

from tests.scheduler.factories import make_request, make_scheduler


def run_step(sched, token=5):
    out = sched.schedule()
    result = StepResult({sr.request_id: token for sr in out.scheduled if sr.needs_sample})
    sched.update_from_output(out, result)
    return out


def test_prefill_then_decode_with_slot_mapping():
    sched = make_scheduler(num_blocks=10, block_size=4)
    req = make_request(6, block_size=4)
    sched.add_request(req)
    out = sched.schedule()
    (sr,) = out.scheduled
    assert sr.token_ids == req.prompt_token_ids and sr.num_computed_tokens == 0 and sr.needs_sample
    assert sr.block_table == [0, 1] and sr.slot_mapping == [0, 1, 2, 3, 4, 5]
    sched.update_from_output(out, StepResult({req.request_id: 9}))
    out = sched.schedule()
    (sr,) = out.scheduled
    assert sr.token_ids == [9] and sr.num_computed_tokens == 6 and sr.slot_mapping == [6]


def test_chunked_prefill_mixes_with_decodes():
    sched = make_scheduler(num_blocks=100, max_num_batched_tokens=20)
    short = make_request(5)
    sched.add_request(short)
    run_step(sched)                                  # short is now decoding
    long = make_request(50)
    sched.add_request(long)
    out = run_step(sched)
    assert [(s.request_id, len(s.token_ids)) for s in out.scheduled] == [(short.request_id, 1), (long.request_id, 19)]
    assert not out.scheduled[1].needs_sample
    out = run_step(sched)
    assert [len(s.token_ids) for s in out.scheduled] == [1, 19]
    out = run_step(sched)
    assert [len(s.token_ids) for s in out.scheduled] == [1, 12] and out.scheduled[1].needs_sample
    assert long.num_output_tokens == 1


def test_max_num_seqs_bounds_running():
    sched = make_scheduler(num_blocks=100, max_num_seqs=2)
    reqs = [make_request(4) for _ in range(3)]
    for r in reqs:
        sched.add_request(r)
    out = run_step(sched)
    assert [s.request_id for s in out.scheduled] == [reqs[0].request_id, reqs[1].request_id]
    assert sched.num_waiting == 1
    sched.finish_requests(reqs[0].request_id, RequestStatus.FINISHED_STOPPED)
    out = run_step(sched)
    assert reqs[2].request_id in [s.request_id for s in out.scheduled]


def test_preemption_of_youngest_and_resume_at_head():
    sched = make_scheduler(num_blocks=4, block_size=4, enable_prefix_caching=False)
    old, young = make_request(7, block_size=4), make_request(7, block_size=4)
    sched.add_request(old)
    sched.add_request(young)
    run_step(sched)
    run_step(sched)                                  # each holds 2 blocks, 9 tokens now
    assert sched.kv.num_free_blocks == 0
    out = run_step(sched)                            # old needs a 3rd block: young is preempted
    assert [s.request_id for s in out.scheduled] == [old.request_id]
    assert young.status == RequestStatus.PREEMPTED and young.num_computed_tokens == 0
    assert sched.waiting[0] is young and sched.num_preemptions == 1
    assert young.request_id in out.preempted_request_ids
    sched.finish_requests(old.request_id, RequestStatus.FINISHED_STOPPED)
    out = sched.schedule()
    (sr,) = out.scheduled                            # young recomputes prompt + its output
    assert sr.request_id == young.request_id and sr.token_ids == young.all_token_ids and sr.needs_sample


def test_prompt_that_can_never_fit_is_rejected():
    sched = make_scheduler(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="at most 7 prompt tokens"):
        sched.add_request(make_request(8, block_size=4))
    sched2 = make_scheduler(num_blocks=100, max_model_len=10)
    with pytest.raises(ValueError, match="max_model_len=10"):
        sched2.add_request(make_request(10))


def test_no_block_leaked_after_finish_and_abort():
    sched = make_scheduler(num_blocks=30, block_size=4, max_num_batched_tokens=16)
    reqs = [make_request(n, block_size=4) for n in (3, 9, 20, 33)]
    for r in reqs:
        sched.add_request(r)
    for _ in range(4):
        run_step(sched)
    sched.finish_requests([reqs[0].request_id, reqs[3].request_id], RequestStatus.FINISHED_ABORTED)
    run_step(sched)
    sched.finish_requests([reqs[1].request_id, reqs[2].request_id], RequestStatus.FINISHED_STOPPED)
    assert sched.kv.num_free_blocks == 30 and not sched.has_unfinished_requests()


def test_n_children_share_prompt_blocks_in_the_same_step():
    sched = make_scheduler(num_blocks=100, block_size=16)
    prompt = list(range(1000))
    children = [make_request(token_ids=prompt, block_size=16) for _ in range(10)]
    for c in children:
        sched.add_request(c)
    sched.schedule()
    one = 63                                         # ceil(1000 / 16)
    used = 100 - sched.kv.num_free_blocks
    assert used <= 1.2 * one


def test_block_table_is_the_live_append_only_list_and_a_new_one_after_preemption():
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = make_request(7, block_size=4), make_request(6, block_size=4)
    sched.add_request(a)
    sched.add_request(b)
    (sa, sb) = run_step(sched).scheduled                          # a: 2 blocks, b: 2 blocks (pool full)
    table = sa.block_table
    assert table is sched.kv.block_ids(a.request_id) and table == [0, 1]
    assert sched.kv.get_block_ids(a.request_id) is not table      # the copying accessor still copies
    out = run_step(sched)                                         # both still fit their blocks
    assert out.scheduled[0].block_table is table and table == [0, 1]
    out = run_step(sched)                                         # a needs a 3rd block: b (youngest) preempted
    assert out.preempted_request_ids == {b.request_id} and out.scheduled[0].block_table is table
    assert table == [0, 1, 3] and sb.block_table == [2, 3]        # grew in place; b's old list is left as it was
    sched.finish_requests(a.request_id, RequestStatus.FINISHED_ABORTED)
    out = run_step(sched)                                         # b comes back
    readmitted = out.scheduled[0]
    assert readmitted.request_id == b.request_id and readmitted.block_table is not sb.block_table
    assert readmitted.block_table is sched.kv.block_ids(b.request_id)


def test_slot_mapping_is_derived_on_first_read_without_per_token_work_in_schedule():
    sched = make_scheduler(num_blocks=10, block_size=4, max_num_batched_tokens=5)
    req = make_request(9, block_size=4)
    sched.add_request(req)
    run_step(sched)
    (sr,) = sched.schedule().scheduled                            # the chunk of positions 5..8
    assert sr._slot_mapping is None                               # nothing computed until a backend asks
    t = sr.block_table
    assert sr.slot_mapping == [t[p // 4] * 4 + p % 4 for p in range(5, 9)]
