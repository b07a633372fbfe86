"""Token-level stops: the scheduler ends requests as it takes each step's tokens."""

import pytest

from scheduler.output import StepResult
from scheduler.request import RequestStatus
from scheduler.scheduler import SchedulerConfig

from tests.scheduler.factories import StopFields, make_request, make_scheduler

EOS = 2


def feed(sched, tokens: dict):
    """One step in which each request named in ``tokens`` samples the given token."""
    out = sched.schedule()
    result = StepResult({sr.request_id: tokens[sr.request_id] for sr in out.scheduled
                         if sr.needs_sample and sr.request_id in tokens})
    return out, sched.update_from_output(out, result)


def run(sched, request, tokens: list[int]) -> int:
    """Feed ``tokens`` one per step until the request ends; returns how many it took."""
    for i, t in enumerate(tokens, 1):
        feed(sched, {request.request_id: t})
        if request.is_finished:
            return i
    return len(tokens)


def one(params=None, num_tokens=5, **config):
    sched = make_scheduler(num_blocks=config.pop("num_blocks", 20), block_size=4, eos_token_ids={EOS}, **config)
    request = make_request(num_tokens, block_size=4, sampling_params=params)
    sched.add_request(request)
    return sched, request


def test_eos_stops_keeps_the_token_and_frees_blocks_in_the_same_update():
    sched, req = one(StopFields())
    other = make_request(5, block_size=4, sampling_params=StopFields())
    sched.add_request(other)
    feed(sched, {req.request_id: 7, other.request_id: 7})
    assert sched.kv.num_free_blocks == 20 - 4
    _, updated = feed(sched, {req.request_id: EOS, other.request_id: 8})
    assert updated == [req, other]                  # the finished request is still reported, once
    assert req.status == RequestStatus.FINISHED_STOPPED and req.stop_reason is None
    assert req.output_token_ids == [7, EOS]
    assert sched.kv.num_free_blocks == 20 - 2 and sched.running == [other] and req.request_id not in sched.requests
    out = sched.schedule()
    assert req.request_id in out.finished_request_ids and [s.request_id for s in out.scheduled] == [other.request_id]


def test_ignore_eos_runs_past_eos():
    sched, req = one(StopFields(ignore_eos=True, max_tokens=4))
    assert run(sched, req, [EOS, EOS, EOS, EOS]) == 4
    assert req.status == RequestStatus.FINISHED_LENGTH and req.output_token_ids == [EOS] * 4


@pytest.mark.parametrize("stop", ["eos", "stop_id"])
def test_min_tokens_suppresses_eos_and_stop_ids_until_more_tokens_are_out(stop):
    token = EOS if stop == "eos" else 9
    sched, req = one(StopFields(min_tokens=3, stop_token_ids=(9,)))
    assert run(sched, req, [token] * 10) == 4       # tokens 1..3 are within min_tokens
    assert req.status == RequestStatus.FINISHED_STOPPED
    assert req.stop_reason == (None if stop == "eos" else 9)


def test_stop_token_id_is_the_stop_reason_and_eos_wins_when_both():
    sched, req = one(StopFields(stop_token_ids=(9, 11)))
    assert run(sched, req, [5, 11, 9]) == 2
    assert (req.status, req.stop_reason, req.output_token_ids) == (RequestStatus.FINISHED_STOPPED, 11, [5, 11])
    sched, req = one(StopFields(stop_token_ids=(EOS,)))
    run(sched, req, [EOS])
    assert req.stop_reason is None                  # EOS is tried first
    sched, req = one(StopFields(ignore_eos=True, stop_token_ids=(EOS,)))
    run(sched, req, [EOS])
    assert (req.status, req.stop_reason) == (RequestStatus.FINISHED_STOPPED, EOS)


def test_max_tokens_ends_for_length_unless_the_last_token_stops():
    sched, req = one(StopFields(max_tokens=3))
    assert run(sched, req, [5, 6, 7, 8]) == 3
    assert req.status == RequestStatus.FINISHED_LENGTH and req.stop_reason is None
    assert sched.kv.num_free_blocks == 20
    sched, req = one(StopFields(max_tokens=3))
    assert run(sched, req, [5, 6, EOS]) == 3
    assert req.status == RequestStatus.FINISHED_STOPPED


@pytest.mark.parametrize("limit", ["max_model_len", "cache"])
def test_the_per_request_token_limit_ends_for_length(limit):
    config = dict(max_model_len=9) if limit == "max_model_len" else dict(num_blocks=3)   # 3 blocks: 12 tokens
    sched, req = one(StopFields(), **config)
    want = sched.config.max_tokens_per_request - req.num_prompt_tokens
    assert run(sched, req, [5] * 20) == want
    assert req.num_tokens == sched.config.max_tokens_per_request
    assert req.status == RequestStatus.FINISHED_LENGTH and sched.kv.num_free_blocks == sched.config.num_kv_blocks


def test_params_none_stop_at_eos_and_the_context_limit_only():
    sched, req = one(None, max_model_len=8)
    assert run(sched, req, [5, 9, EOS]) == 3 and req.status == RequestStatus.FINISHED_STOPPED
    sched, req = one(None, max_model_len=8)
    assert run(sched, req, [5] * 10) == 3 and req.status == RequestStatus.FINISHED_LENGTH
    sched = make_scheduler(num_blocks=20, block_size=4)       # no EOS ids configured: EOS is a plain token
    req = make_request(5, block_size=4)
    sched.add_request(req)
    assert run(sched, req, [EOS] * 3) == 3 and not req.is_finished


def test_finishing_again_from_outside_is_a_no_op():
    sched, req = one(StopFields(max_tokens=1))
    run(sched, req, [5])
    assert sched.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED) == []
    assert req.status == RequestStatus.FINISHED_LENGTH and sched.kv.num_free_blocks == 20


def test_a_chunked_prefill_step_that_samples_nothing_never_stops():
    sched, req = one(StopFields(max_tokens=1), num_tokens=30, max_num_batched_tokens=8, num_blocks=40)
    out, updated = feed(sched, {req.request_id: EOS})
    assert not out.scheduled[0].needs_sample and updated == [] and not req.is_finished


def test_eos_token_ids_are_validated():
    assert SchedulerConfig(num_kv_blocks=4, eos_token_ids=[3, 3, 4]).eos_token_ids == frozenset({3, 4})
    with pytest.raises(ValueError, match="eos_token_ids"):
        SchedulerConfig(num_kv_blocks=4, eos_token_ids=[-1])
