"""Coalescing of deltas that pile up behind slow writes."""

from __future__ import annotations

from engine.outputs import CompletionOutput, RequestOutput
from scheduler.output import Logprobs
from service.streaming import merge_deltas


def _delta(text, ids, index=0, finish=None, stop=None, lps=None, finished=False, cached=0):
    return RequestOutput("r", None, [1, 2], [CompletionOutput(index, text, ids, finish, stop, lps)], finished,
                         num_cached_tokens=cached)


def test_merge_deltas_concatenates_each_completion_in_order():
    lp = [Logprobs(5, -1.0, 1)]
    merged = merge_deltas([_delta("a", [5], lps=lp), _delta("x", [9], index=1),
                           _delta("b", [6], lps=lp, cached=2),
                           _delta("c", [7], finish="stop", stop=7, lps=lp, finished=True, cached=2)])
    first, second = merged.outputs
    assert (first.index, first.text, first.token_ids, first.finish_reason, first.stop_reason) == \
        (0, "abc", [5, 6, 7], "stop", 7)
    assert len(first.logprobs) == 3 and second.text == "x" and second.finish_reason is None
    assert merged.finished and merged.num_cached_tokens == 2


def test_merge_deltas_leaves_its_inputs_alone():
    deltas = [_delta("a", [1]), _delta("b", [2])]
    merge_deltas(deltas)
    assert [d.outputs[0].text for d in deltas] == ["a", "b"] and deltas[0].outputs[0].token_ids == [1]
