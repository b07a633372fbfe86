"""The output processor: text, stop strings, and the scheduler's stop verdicts."""

from __future__ import annotations

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.output_processor import CompletionState, OutputProcessor, RequestState
from engine.outputs import RequestMetrics
from engine.sampling_params import SamplingParams
from tests.factories import make_tiny_tokenizer


@pytest.fixture(scope="module")
def hf():
    return make_tiny_tokenizer()


def processor(hf, **params):
    p = SamplingParams(**params)
    c = CompletionState(0, "s0", p, IncrementalDetokenizer(hf, stop=p.stop))
    out = OutputProcessor()
    out.add(RequestState("r", None, [1, 2], p, [c], RequestMetrics(0.0)))
    return out, c


def feed(out, ids, verdicts=None):
    verdicts = verdicts or {}
    for i, t in enumerate(ids):
        out.process_token("s0", t, None, 1.0, *verdicts.get(i, (None, None)))


def test_a_stop_verdict_keeps_the_token_in_ids_but_not_in_text(hf):
    ids = hf.encode("hello world", add_special_tokens=False)
    out, c = processor(hf)
    feed(out, ids, {len(ids) - 1: ("stop", ids[-1])})
    delta = out.make_delta(out.states["r"]).outputs[0]
    assert delta.token_ids == ids and delta.text == hf.decode(ids[:-1])
    assert (delta.finish_reason, delta.stop_reason) == ("stop", ids[-1])


def test_a_stop_string_on_the_length_token_wins_as_stop(hf):
    ids = hf.encode("hello world", add_special_tokens=False)
    last = hf.decode(ids[-1:])
    out, c = processor(hf, stop=(last,))
    feed(out, ids, {len(ids) - 1: ("length", None)})
    delta = out.make_delta(out.states["r"]).outputs[0]
    assert (delta.finish_reason, delta.stop_reason) == ("stop", last) and delta.text == hf.decode(ids[:-1])
    out, c = processor(hf, stop=("zzz",))
    feed(out, ids, {len(ids) - 1: ("length", None)})
    assert (c.finish_reason, c.stop_reason) == ("length", None)


def test_a_stop_string_alone_ends_the_completion_past_min_tokens_only(hf):
    ids = hf.encode("a b a b a b", add_special_tokens=False)
    first_b = next(i for i in range(len(ids)) if "b" in hf.decode(ids[:i + 1]))
    out, c = processor(hf, stop=("b",))
    feed(out, ids[:first_b + 1])
    assert (c.finish_reason, c.stop_reason) == ("stop", "b")
    out, c = processor(hf, stop=("b",), min_tokens=first_b + 2)
    feed(out, ids[:first_b + 1])
    assert c.finish_reason is None                  # not checked while fewer than min_tokens are out
