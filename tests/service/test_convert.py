"""from_pb / to_pb: round trips, defaults, and errors naming the proto field."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import InvalidRequestError
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import MAX_LOGPROBS, SamplingParams
from pagedgen_client import _request
from pagedgen_client._proto.pagedgen.v1 import generate_pb2 as pb
from pagedgen_client.types import GenerateChunk
from scheduler.output import Logprobs
from service import convert

finite = dict(allow_nan=False, allow_infinity=False)
sampling_params = st.builds(
    SamplingParams,
    n=st.integers(1, 8),
    temperature=st.floats(0, 5, **finite),
    top_p=st.floats(0.01, 1, **finite),
    top_k=st.integers(0, 100),
    min_p=st.floats(0, 1, **finite),
    seed=st.none() | st.integers(0, 2**62),
    presence_penalty=st.floats(-2, 2, **finite),
    frequency_penalty=st.floats(-2, 2, **finite),
    repetition_penalty=st.floats(0.01, 3, **finite),
    max_tokens=st.integers(1, 4096),
    min_tokens=st.just(0),
    stop=st.lists(st.text(min_size=1, max_size=5), max_size=3).map(tuple),
    stop_token_ids=st.lists(st.integers(0, 50000), max_size=3).map(tuple),
    ignore_eos=st.booleans(),
    logprobs=st.none() | st.integers(0, MAX_LOGPROBS),
    skip_special_tokens=st.booleans(),
    include_stop_str_in_output=st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(sampling_params)
def test_sampling_params_round_trip(params):
    wire = pb.SamplingParams.FromString(convert.sampling_params_to_pb(params).SerializeToString())
    assert convert.sampling_params_from_pb(wire) == params


def test_unset_sampling_fields_take_the_engine_defaults():
    # ...but max_tokens: unset is up to the context (None), as in the HTTP API.
    assert convert.sampling_params_from_pb(pb.SamplingParams()) == SamplingParams(max_tokens=None)
    # An explicit zero is a value, not "unset".
    assert convert.sampling_params_from_pb(pb.SamplingParams(temperature=0)).temperature == 0.0
    assert SamplingParams().temperature != 0.0
    assert convert.sampling_params_from_pb(pb.SamplingParams(skip_special_tokens=False)).skip_special_tokens is False


def test_client_keyword_arguments_reach_the_engine_unchanged():
    kwargs = dict(temperature=0.7, top_p=0.9, top_k=40, seed=7, max_tokens=33, stop="END",
                  stop_token_ids=[5, 6], logprobs=2, n=3, ignore_eos=True, skip_special_tokens=False)
    wire = pb.SamplingParams.FromString(_request.sampling_params_pb(kwargs).SerializeToString())
    assert convert.sampling_params_from_pb(wire) == SamplingParams(**kwargs)


@pytest.mark.parametrize("field, value", [
    ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -5), ("min_p", 2.0),
    ("presence_penalty", 3.0), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0),
    ("max_tokens", 0), ("max_tokens", -3), ("min_tokens", -1), ("n", 0), ("logprobs", MAX_LOGPROBS + 1),
    ("logprobs", -1),
])
def test_invalid_sampling_values_name_the_proto_field(field, value):
    with pytest.raises(InvalidRequestError, match=rf"^sampling\.{field}\b"):
        convert.sampling_params_from_pb(pb.SamplingParams(**{field: value}))


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(InvalidRequestError, match=r"^sampling\.min_tokens"):
        convert.sampling_params_from_pb(pb.SamplingParams(min_tokens=10, max_tokens=5))


def test_empty_stop_string_is_rejected():
    with pytest.raises(InvalidRequestError, match=r"^sampling\.stop\b"):
        convert.sampling_params_from_pb(pb.SamplingParams(stop=[""]))


def test_generate_request_inputs():
    req = convert.generate_request_from_pb(pb.GenerateRequest(request_id="r1", prompt="hi"))
    assert (req.request_id, req.prompt, req.return_token_ids, req.cache_salt) == ("r1", "hi", True, None)
    req = convert.generate_request_from_pb(
        pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, 2]), return_token_ids=False, cache_salt="t"))
    assert req.prompt_token_ids == [1, 2] and req.return_token_ids is False and req.cache_salt == "t"
    assert req.request_id                                   # assigned
    req = convert.generate_request_from_pb(pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="x")])))
    assert req.messages == [{"role": "user", "content": "x"}]
    assert set(req.engine_kwargs()) == {"prompt", "prompt_token_ids", "messages", "sampling_params", "cache_salt"}


@pytest.mark.parametrize("request_pb, field", [
    (pb.GenerateRequest(), "input"),
    (pb.GenerateRequest(prompt=""), "prompt"),
    (pb.GenerateRequest(prompt_token_ids=pb.TokenIds()), "prompt_token_ids.ids"),
    (pb.GenerateRequest(chat=pb.ChatMessages()), "chat.messages"),
    (pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(content="x")])), r"chat.messages\[0\].role"),
    (pb.GenerateRequest(prompt="x", request_id="r" * 300), "request_id"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=2)), "sampling.top_p"),
])
def test_invalid_generate_requests_name_the_field(request_pb, field):
    with pytest.raises(InvalidRequestError, match=rf"^{field}\b"):
        convert.generate_request_from_pb(request_pb)


def test_detokenize_ids_outside_the_vocabulary_are_rejected():
    with pytest.raises(InvalidRequestError, match=r"^token_ids\[1\]"):
        convert.detokenize_ids_from_pb(pb.DetokenizeRequest(token_ids=[1, 100]), vocab_size=100)


def _out(rid, completions, finished, cached=0):
    return RequestOutput(rid, None, [1, 2, 3, 4], completions, finished, num_cached_tokens=cached)


def test_response_stream_sends_deltas_and_usage_on_each_completions_last_message():
    stream = convert.ResponseStream("r", return_token_ids=True)
    lp = Logprobs(7, -0.25, 2, [(9, -0.1), (7, -0.25)])
    first = stream.to_pb(_out("r", [CompletionOutput(0, "a", [7], logprobs=[lp]), CompletionOutput(1, "", [])], False))
    assert [(m.index, m.text, list(m.token_ids)) for m in first] == [(0, "a", [7])]   # empty delta skipped
    assert not first[0].HasField("usage") and first[0].finish_reason == pb.FINISH_REASON_UNSPECIFIED
    chunk = GenerateChunk.from_pb(first[0])
    assert chunk.logprobs[0].top == [(9, pytest.approx(-0.1)), (7, pytest.approx(-0.25))]
    assert chunk.logprobs[0].rank == 2
    last = stream.to_pb(_out("r", [CompletionOutput(0, "b", [8], "stop", "b"),
                                   CompletionOutput(1, "c", [5, 6], "length")], True, cached=2))
    usage = [(m.index, m.usage.prompt_tokens, m.usage.completion_tokens, m.usage.cached_prompt_tokens) for m in last]
    assert usage == [(0, 4, 2, 2), (1, 4, 2, 2)]
    chunks = [GenerateChunk.from_pb(m) for m in last]
    assert [(c.finish_reason, c.stop_reason) for c in chunks] == [("stop", "b"), ("length", None)]
    assert stream.num_completion_tokens == 4 and stream.finish_reasons == {0: "stop", 1: "length"}


def test_stop_token_id_and_hidden_token_ids():
    msg = convert.completion_to_pb("r", CompletionOutput(0, "", [2], "stop", 2), return_token_ids=False)
    chunk = GenerateChunk.from_pb(msg)
    assert chunk.stop_reason == 2 and chunk.token_ids == [] and chunk.finish_reason == "stop"


def test_model_info_and_stats_to_pb():
    from engine.model_info import ModelInfo
    from engine.llm_engine import EngineStats
    from pagedgen_client.types import ModelInfo as ClientModelInfo, Stats

    info = ModelInfo("m", 2048, 49152, (0, 2), 16, 100, "cpu", "float32")
    got = ClientModelInfo.from_pb(convert.model_info_to_pb(info)).__dict__
    assert {k: got[k] for k in info.__dict__} == info.__dict__ and got["loaded_model"] == "m"
    stats = EngineStats(1, 2, 100, 90, 3, 640, 320)
    assert Stats.from_pb(convert.stats_to_pb(stats)).__dict__ == stats.__dict__
