"""The priority policy: queue order, ties first come first served, preemption victims."""

import pytest

from scheduler.output import StepResult
from scheduler.request import Request
from scheduler.scheduler import SchedulerConfig

from tests.scheduler.factories import make_scheduler


def run_step(sched, token=5):
    out = sched.schedule()
    sched.update_from_output(out, StepResult({sr.request_id: token for sr in out.scheduled if sr.needs_sample}))
    return out


def prio_request(rid: str, priority: int, num_tokens: int = 4, block_size: int = 16) -> Request:
    return Request(rid, [7] * num_tokens, None, block_size, priority=priority)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="policy"):
        SchedulerConfig(num_kv_blocks=4, policy="lifo")


def test_waiting_queue_is_ordered_by_priority_then_arrival():
    sched = make_scheduler(policy="priority", max_num_seqs=1)
    for rid, prio in [("a", 5), ("b", 1), ("c", 5), ("d", -2), ("e", 1)]:
        sched.add_request(prio_request(rid, prio))
    assert [r.request_id for r in sched.waiting] == ["d", "b", "e", "a", "c"]
    order = []
    while sched.has_unfinished_requests():
        out = run_step(sched)
        rid = out.scheduled[0].request_id
        order.append(rid)
        sched.finish_requests(rid, sched.requests[rid].status.FINISHED_STOPPED)
    assert order == ["d", "b", "e", "a", "c"]


def test_late_high_priority_request_overtakes_a_full_queue():
    sched = make_scheduler(policy="priority", max_num_seqs=2)
    for i in range(6):
        sched.add_request(prio_request(f"low{i}", 10))
    out = run_step(sched)
    assert [s.request_id for s in out.scheduled] == ["low0", "low1"]
    sched.add_request(prio_request("urgent", 0))       # arrives last, while four wait
    assert sched.waiting[0].request_id == "urgent"
    sched.finish_requests("low0", sched.requests["low0"].status.FINISHED_STOPPED)
    out = run_step(sched)
    assert [s.request_id for s in out.scheduled] == ["low1", "urgent"]
    assert [r.request_id for r in sched.waiting] == ["low2", "low3", "low4", "low5"]


def test_fcfs_ignores_priority():
    sched = make_scheduler(policy="fcfs", max_num_seqs=1)
    sched.add_request(prio_request("first", 9))
    sched.add_request(prio_request("second", 0))
    assert [r.request_id for r in sched.waiting] == ["first", "second"]


def _fill_then_grow(policy: str):
    """Four 3-token prompts fill a pool of 4 blocks of 4 tokens; the third
    step's decodes (position 4) each need a second block."""
    sched = make_scheduler(num_blocks=4, block_size=4, policy=policy)
    for rid, prio in [("p0", 0), ("p9a", 9), ("p9b", 9), ("p1", 1)]:
        sched.add_request(prio_request(rid, prio, num_tokens=3, block_size=4))
    run_step(sched)
    run_step(sched)
    assert sched.num_preemptions == 0 and sched.kv.num_free_blocks == 0
    return sched


def test_preemption_takes_the_lowest_priority_youngest_running_request():
    sched = _fill_then_grow("priority")
    assert [r.request_id for r in sched.running] == ["p0", "p1", "p9a", "p9b"]   # admitted by priority
    out = run_step(sched)
    # p0's growth evicts p9b (priority 9, the younger), p1's evicts p9a.
    assert [s.request_id for s in out.scheduled] == ["p0", "p1"]
    assert out.preempted_request_ids == {"p9a", "p9b"} and sched.num_preemptions == 2
    assert [r.request_id for r in sched.waiting] == ["p9a", "p9b"]           # back in (priority, arrival) order


def test_fcfs_preemption_takes_the_youngest():
    sched = _fill_then_grow("fcfs")
    assert [r.request_id for r in sched.running] == ["p0", "p9a", "p9b", "p1"]   # admitted by arrival
    out = run_step(sched)
    assert [s.request_id for s in out.scheduled] == ["p0", "p9a"]
    assert [r.request_id for r in sched.waiting] == ["p9b", "p1"]            # youngest first, each to the head


def test_prompt_logprob_requests_skip_prefix_cache_hits_until_their_prompt_is_done():
    sched = make_scheduler(num_blocks=20, block_size=4)
    prompt = list(range(100, 110))
    sched.add_request(Request("warm", prompt, None, 4))
    run_step(sched)
    scorer = Request("score", prompt, None, 4, num_prompt_logprobs=2)
    plain = Request("plain", prompt, None, 4)
    sched.add_request(scorer)
    sched.add_request(plain)
    out = sched.schedule()
    by_id = {s.request_id: s for s in out.scheduled}
    assert by_id["score"].num_computed_tokens == 0 and len(by_id["score"].token_ids) == 10
    assert by_id["score"].needs_prompt_logprobs and by_id["score"].num_prompt_logprobs == 2
    assert by_id["plain"].num_computed_tokens == 8 and not by_id["plain"].needs_prompt_logprobs
    sched.update_from_output(out, StepResult({"score": 1, "plain": 1, "warm": 1}))
    out = sched.schedule()
    assert not {s.request_id: s for s in out.scheduled}["score"].needs_prompt_logprobs


def test_chunked_prefill_marks_only_chunks_with_prompt_positions_to_score():
    sched = make_scheduler(num_blocks=20, block_size=4, max_num_batched_tokens=4)
    sched.add_request(Request("s", list(range(1, 10)), None, 4, num_prompt_logprobs=0))   # 9 prompt tokens
    flags = []
    for _ in range(3):
        out = run_step(sched)
        (sr,) = out.scheduled
        flags.append((sr.num_computed_tokens, len(sr.token_ids), sr.needs_prompt_logprobs))
    assert flags == [(0, 4, True), (4, 4, True), (8, 1, False)]   # the last chunk predicts no prompt token
