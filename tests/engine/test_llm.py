"""The offline API: sampling features, outputs, and bad input."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from common.errors import InvalidRequestError
from tests.factories import make_tiny_hf_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(str(make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), arch="llama")), num_kv_blocks=256)


PROMPT = "hello world, this is"


def test_seeded_sampling_is_reproducible_and_seeds_differ(llm):
    p = SamplingParams(temperature=1.0, seed=123, max_tokens=24, ignore_eos=True)
    a = llm.generate([PROMPT], p)[0].outputs[0].token_ids
    b = llm.generate([PROMPT, "other prompt in the batch"], p)[0].outputs[0].token_ids
    c = llm.generate([PROMPT], SamplingParams(temperature=1.0, seed=124, max_tokens=24, ignore_eos=True))[0]
    assert a == b and a != c.outputs[0].token_ids


def test_top_k_1_equals_greedy(llm):
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    topk = llm.generate([PROMPT], SamplingParams(temperature=1.0, top_k=1, max_tokens=20, ignore_eos=True))
    assert greedy[0].outputs[0].token_ids == topk[0].outputs[0].token_ids


def test_n_completions_logprobs_and_metrics(llm):
    out = llm.generate([PROMPT], SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=8, ignore_eos=True,
                                                logprobs=2))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        assert len(c.token_ids) == 8 and c.finish_reason == "length" and len(c.logprobs) == 8
        assert all(lp.token_id == t and len(lp.top) == 2 for lp, t in zip(c.logprobs, c.token_ids))
    m = out.metrics
    assert m.arrival_time <= m.first_token_time <= m.finished_time


def test_stop_token_ids_and_text_equals_decode(llm):
    first = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    stop_id = first.token_ids[3]
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                stop_token_ids=[stop_id]))[0].outputs[0]
    k = first.token_ids.index(stop_id)
    assert out.token_ids == first.token_ids[:k + 1] and out.stop_reason == stop_id
    assert first.text == llm.tokenizer.decode(first.token_ids)


def test_min_tokens_delays_eos(llm):
    eos = llm.tokenizer.eos_token_ids[0]
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, min_tokens=12,
                                                stop_token_ids=[eos]))[0].outputs[0]
    assert len(out.token_ids) == 12


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_tokens=-1), "max_tokens"), (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(n=0), "n"), (dict(min_p=2.0), "min_p"),
    (dict(logprobs=100), "logprobs"), (dict(repetition_penalty=0), "repetition_penalty"),
])
def test_sampling_params_name_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_and_engine_keeps_serving(llm):
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([""])
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        llm.generate([[1, 2, 10**6]])
    with pytest.raises(InvalidRequestError, match="shorten the prompt"):
        llm.generate([[5] * 10_000])
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate([PROMPT], SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope"))


def test_stop_string_on_the_max_tokens_token_wins_and_every_block_is_freed(llm):
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ids = llm.generate([PROMPT], greedy)[0].outputs[0].token_ids
    decode = llm.tokenizer.decode
    k, piece = next((k, decode(ids[:k])[len(decode(ids[:k - 1])):]) for k in range(2, len(ids))
                    if decode(ids[:k]).startswith(decode(ids[:k - 1])) and "\ufffd" not in decode(ids[:k])
                    and decode(ids[:k])[len(decode(ids[:k - 1])):].strip()
                    and decode(ids[:k])[len(decode(ids[:k - 1])):] not in decode(ids[:k - 1]))
    at_max = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=k, ignore_eos=True, stop=[piece]))
    before = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=k - 1, ignore_eos=True, stop=[piece]))
    out, short = at_max[0].outputs[0], before[0].outputs[0]
    assert (out.finish_reason, out.stop_reason, out.token_ids) == ("stop", piece, ids[:k])
    assert (short.finish_reason, short.stop_reason, short.token_ids) == ("length", None, ids[:k - 1])
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks and not llm.engine.scheduler.has_unfinished_requests()


def test_auto_dtype_is_reported_resolved(llm):
    from engine.model_info import ModelInfo

    assert llm.engine.args.dtype == "auto"                  # the default everywhere
    assert llm.engine.dtype == llm.engine.backend.dtype == "float32"    # what the cpu backend chose
    assert ModelInfo.of(llm.engine).dtype == "float32"
