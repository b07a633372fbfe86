"""Priority, prompt truncation and scoring (prompt logprobs, echo) through gRPC, HTTP and offline."""

from __future__ import annotations

import threading
import time

import grpc
import openai
import pytest

from engine import LLM, SamplingParams
from pagedgen_client._proto.pagedgen.v1 import generate_pb2 as pb
from pagedgen_client._proto.pagedgen.v1 import generate_pb2_grpc as pb_grpc
from service.server import ServerOptions
from tests.service.conftest import serving

pytestmark = pytest.mark.timeout(180)

PROMPT = "The cat watches the answer while a small robot builds a paper boat"
TOL = 1e-4


@pytest.fixture(scope="module")
def fcfs(tiny_model_dir):
    with serving(tiny_model_dir, ServerOptions(port=0, openai_port=0)) as srv, \
            grpc.insecure_channel(srv.address) as channel, \
            openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key="none", max_retries=0, timeout=60) as srv.oa:
        srv.stub = pb_grpc.GenerateStub(channel)
        yield srv


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    return LLM(tiny_model_dir, num_kv_blocks=256, block_size=16, seed=0)


def _invalid(call, field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert field in info.value.details()


# -- priority -----------------------------------------------------------------------

def test_priority_under_fcfs_is_refused_naming_the_flag(fcfs, offline):
    req = pb.GenerateRequest(prompt="hi", priority=3, sampling=pb.SamplingParams(max_tokens=2))
    _invalid(lambda: list(fcfs.stub.Generate(req)), "--scheduling-policy")
    with pytest.raises(openai.BadRequestError) as info:
        fcfs.oa.completions.create(model=None, prompt="hi", max_tokens=2, extra_body={"priority": 1})
    assert "--scheduling-policy" in info.value.message and "priority" in info.value.message
    with pytest.raises(Exception, match="--scheduling-policy"):
        offline.generate(["hi"], SamplingParams(priority=1))
    assert list(fcfs.stub.Generate(pb.GenerateRequest(prompt="hi", priority=0,
                                                      sampling=pb.SamplingParams(max_tokens=2))))


def test_late_high_priority_request_overtakes_a_full_queue(tiny_model_dir):
    first: dict[str, int] = {}        # request -> when the engine produced its first token (server clock)
    with serving(tiny_model_dir, ServerOptions(port=0, openai_port=0), scheduling_policy="priority",
                 max_num_seqs=1) as srv:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.GenerateStub(channel)

            def run(rid: str, priority: int, max_tokens: int) -> None:
                req = pb.GenerateRequest(request_id=rid, prompt=f"{rid} says", priority=priority, return_timing=True,
                                         sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
                for msg in stub.Generate(req):                 # the engine's clock, not when a client thread woke up
                    if msg.token_ids:
                        first.setdefault(rid, msg.engine_time_unix_nanos)

            threads = [threading.Thread(target=run, args=("head", 5, 200))]
            threads[0].start()
            end = time.monotonic() + 10
            while stub.GetStats(pb.GetStatsRequest()).num_running < 1:
                assert time.monotonic() < end
                time.sleep(0.005)
            for i in range(4):                                 # the queue fills behind "head"
                threads.append(threading.Thread(target=run, args=(f"low{i}", 5, 4)))
                threads[-1].start()
                while stub.GetStats(pb.GetStatsRequest()).num_waiting < i + 1:
                    assert time.monotonic() < end
                    time.sleep(0.005)
            threads.append(threading.Thread(target=run, args=("urgent", 0, 4)))
            threads[-1].start()
            while stub.GetStats(pb.GetStatsRequest()).num_waiting < 5:
                assert time.monotonic() < end
                time.sleep(0.005)
            for t in threads:
                t.join(timeout=60)
        assert sorted(first, key=first.get) == ["head", "urgent", "low0", "low1", "low2", "low3"]


# -- prompt truncation ----------------------------------------------------------------

def test_truncate_prompt_tokens_keeps_the_last_tokens_everywhere(fcfs, offline):
    ids = offline.tokenizer.encode(PROMPT)
    (want,) = offline.generate([ids[-5:]], SamplingParams(temperature=0, max_tokens=4))
    (got,) = offline.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, truncate_prompt_tokens=5))
    assert got.prompt_token_ids == ids[-5:] and got.outputs[0].token_ids == want.outputs[0].token_ids
    msgs = list(fcfs.stub.Generate(pb.GenerateRequest(prompt=PROMPT, truncate_prompt_tokens=5,
                                                      sampling=pb.SamplingParams(max_tokens=4, temperature=0))))
    assert [t for m in msgs for t in m.token_ids] == want.outputs[0].token_ids
    assert msgs[-1].usage.prompt_tokens == 5
    out = fcfs.oa.completions.create(model=None, prompt=PROMPT, max_tokens=4, temperature=0,
                                     extra_body={"truncate_prompt_tokens": 5})
    assert out.usage.prompt_tokens == 5 and out.choices[0].text == want.outputs[0].text
    chat = fcfs.oa.chat.completions.create(model=None, messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=2, extra_body={"truncate_prompt_tokens": 3})
    assert chat.usage.prompt_tokens == 3                     # after the chat template


def test_truncation_larger_than_the_context_is_refused(fcfs, offline):
    too_many = 10_000                                       # the tiny model's context is 512
    _invalid(lambda: list(fcfs.stub.Generate(pb.GenerateRequest(
        prompt="hi", truncate_prompt_tokens=too_many, sampling=pb.SamplingParams(max_tokens=2)))),
        "truncate_prompt_tokens")
    _invalid(lambda: list(fcfs.stub.Generate(pb.GenerateRequest(
        prompt="hi", truncate_prompt_tokens=-1, sampling=pb.SamplingParams(max_tokens=2)))),
        "truncate_prompt_tokens")
    with pytest.raises(openai.BadRequestError) as info:
        fcfs.oa.completions.create(model=None, prompt="hi", extra_body={"truncate_prompt_tokens": too_many})
    assert "truncate_prompt_tokens" in info.value.message
    with pytest.raises(Exception, match="truncate_prompt_tokens"):
        offline.generate(["hi"], SamplingParams(truncate_prompt_tokens=too_many))
    assert fcfs.oa.completions.create(model=None, prompt="hi", max_tokens=2).choices


# -- scoring ---------------------------------------------------------------------------

def _close(a: float, b: float) -> bool:
    return abs(a - b) < TOL


def test_prompt_logprobs_over_grpc_equal_offline(fcfs, offline):
    (ref,) = offline.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))
    msgs = list(fcfs.stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(
        max_tokens=1, temperature=0, prompt_logprobs=2))))
    scored = [lp for m in msgs for lp in m.prompt_logprobs]
    assert len(scored) == len(ref.prompt_token_ids) - 1
    for got, want in zip(scored, ref.prompt_logprobs[1:]):
        assert got.token_id == want.token_id and _close(got.logprob, want.logprob) and got.rank == want.rank
        assert [t.token_id for t in got.top_logprobs] == [t for t, _ in want.top]
    with fcfs.client() as client:
        chunks = list(client.generate(PROMPT, max_tokens=1, prompt_logprobs=0))
        assert len([c for c in chunks if c.prompt_logprobs][0].prompt_logprobs) == len(ref.prompt_token_ids) - 1
    _invalid(lambda: list(fcfs.stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(
        prompt_logprobs=99)))), "prompt_logprobs")


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_as_evaluation_harnesses_read_them(fcfs, offline, max_tokens):
    (ref,) = offline.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    for _ in range(2):                                      # the second call finds the prompt in the prefix cache
        out = fcfs.oa.completions.create(model=None, prompt=PROMPT, max_tokens=max_tokens, echo=True,
                                         logprobs=1, temperature=0)
        lp = out.choices[0].logprobs
        num_prompt = len(ref.prompt_token_ids)
        assert len(lp.tokens) == num_prompt + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for got, want in zip(lp.token_logprobs[1:num_prompt], ref.prompt_logprobs[1:]):
            assert _close(got, want.logprob)
        assert out.choices[0].text.startswith(PROMPT)
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert all(len(top) == 1 for top in lp.top_logprobs[1:])
        if max_tokens == 0:
            assert out.choices[0].text == PROMPT and out.usage.completion_tokens == 0
