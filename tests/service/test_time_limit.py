"""time_limit_ms: the completion ends with finish reason time_limit and the text so far, in every API."""

from __future__ import annotations

import time
from typing import Callable

import grpc
import openai
import pytest

from engine import LLM, SamplingParams
from pagedgen_client._proto.pagedgen.v1 import generate_pb2 as pb
from pagedgen_client._proto.pagedgen.v1 import generate_pb2_grpc as pb_grpc
from service.server import ServerOptions
from tests.service.conftest import serving

pytestmark = pytest.mark.timeout(120)

MAX = 480                                   # hundreds of steps


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with serving(tiny_model_dir, ServerOptions(port=0, openai_port=0)) as srv:
        yield srv


def third_of_fastest_ms(run: Callable[[], None], runs: int = 3) -> int:
    """A third of how long ``run`` (MAX tokens unlimited) takes here, the fastest of ``runs``: a limit that
    ends such a request well inside it, on a fast machine as on a slow one."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return max(1, int(min(times) * 1000 / 3))


@pytest.fixture(scope="module")
def limit_ms(stub) -> int:
    """``third_of_fastest_ms`` through the server."""
    def run() -> None:
        msgs = list(stub.Generate(_request()))
        assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH and msgs[-1].usage.completion_tokens == MAX
    return third_of_fastest_ms(run)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GenerateStub(channel)


def _request(**kwargs) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt="The cat watches", sampling=pb.SamplingParams(
        max_tokens=MAX, ignore_eos=True, temperature=0), **kwargs)


def test_grpc_time_limit_ends_with_time_limit_and_the_text_so_far(stub, limit_ms):
    msgs = list(stub.Generate(_request(time_limit_ms=limit_ms)))     # (without one it runs to MAX: limit_ms)
    last = msgs[-1]
    assert last.finish_reason == pb.FINISH_REASON_TIME_LIMIT
    assert 0 < last.usage.completion_tokens < MAX
    assert sum(len(m.token_ids) for m in msgs) == last.usage.completion_tokens


@pytest.mark.parametrize("value", [-1, 0])
def test_grpc_bad_time_limit_is_invalid_argument_naming_the_field(stub, value):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(_request(time_limit_ms=value)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "time_limit_ms" in info.value.details()
    assert list(stub.Generate(pb.GenerateRequest(prompt="still serving", sampling=pb.SamplingParams(max_tokens=2))))


def test_http_time_limit_field(server, limit_ms):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.openai_port}/v1", api_key="none",
                       max_retries=0) as oa:
        out = oa.completions.create(model=None, prompt="The cat watches", max_tokens=MAX, temperature=0,
                                    extra_body={"ignore_eos": True, "time_limit_ms": limit_ms})
        assert out.choices[0].finish_reason == "time_limit" and 0 < out.usage.completion_tokens < MAX
        chat = oa.chat.completions.create(model=None, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX,
                                          temperature=0, extra_body={"ignore_eos": True, "time_limit_ms": limit_ms})
        assert chat.choices[0].finish_reason == "time_limit"
        with pytest.raises(openai.BadRequestError) as info:
            oa.completions.create(model=None, prompt="x", extra_body={"time_limit_ms": -5})
        assert "time_limit_ms" in info.value.message
        assert oa.completions.create(model=None, prompt="x", max_tokens=2).choices[0].finish_reason == "length"


def test_offline_time_limit_and_the_server_default(tiny_model_dir):
    params = SamplingParams(max_tokens=MAX, ignore_eos=True, temperature=0)
    plain = LLM(tiny_model_dir, num_kv_blocks=256)

    def run() -> None:                                  # in-process: faster than through the server
        (full,) = plain.generate(["The cat watches"], params)
        assert full.outputs[0].finish_reason == "length"
    llm = LLM(tiny_model_dir, num_kv_blocks=256, default_time_limit_ms=third_of_fastest_ms(run))
    (out,) = llm.generate(["The cat watches"], params)                      # the engine's default applies
    assert out.outputs[0].finish_reason == "time_limit" and 0 < len(out.outputs[0].token_ids) < MAX
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)
    assert llm.get_stats().kv_blocks_free == llm.get_stats().kv_blocks_total
    (long,) = llm.generate(["The cat watches"], SamplingParams(max_tokens=MAX, ignore_eos=True, temperature=0,
                                                                time_limit_ms=600_000))   # the request's wins
    assert long.outputs[0].finish_reason == "length"
