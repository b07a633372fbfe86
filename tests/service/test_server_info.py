"""What a server says about itself: GetServerInfo, GetStats' token counts, and
HTTP /version, /tokenize, /detokenize, against a real server on the tiny model."""

from __future__ import annotations

import asyncio
import importlib.metadata
import threading
import time

import grpc
import httpx
import pytest

from pagedgen_client import AsyncClient
from pagedgen_client._proto.pagedgen.v1 import generate_pb2 as pb
from pagedgen_client._proto.pagedgen.v1 import generate_pb2_grpc as pb_grpc
from service.limits import RequestLimits
from service.server import ServerOptions
from tests.service.conftest import serving, tiny_engine_args

pytestmark = pytest.mark.timeout(120)

API_KEY = "info-key"
SERVED = "served-tiny"
LIMITS = RequestLimits(max_n=3, max_tokens=300, max_stop_strings=4, max_stop_string_len=32)
ENGINE = dict(max_num_seqs=1, max_num_batched_tokens=256, max_queue=7, max_prompt_tokens=100)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    options = ServerOptions(port=0, openai_port=0, api_key=API_KEY, served_model_name=SERVED, limits=LIMITS,
                            max_message_bytes=2**20)
    with serving(tiny_model_dir, options, **ENGINE) as srv, \
            httpx.Client(base_url=srv.http_url, headers={"authorization": f"Bearer {API_KEY}"}, timeout=30) as srv.http:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client(api_key=API_KEY) as c:
        yield c


# -- GetServerInfo -------------------------------------------------------------------------

def test_server_info_describes_version_sizing_and_limits(server, client):
    info = client.server_info()
    model = client.model_info()
    assert info.version == importlib.metadata.version("pagedgen")
    assert info.model == SERVED == model.model
    assert (info.backend, info.dtype, info.weight_format) == ("cpu", "float32", "float32")
    assert (info.max_num_seqs, info.max_num_batched_tokens, info.max_queue) == (1, 256, 7)
    assert (info.max_model_len, info.block_size, info.num_kv_blocks) == (model.max_model_len, 16, 256)
    lim = info.limits
    assert (lim.max_n, lim.max_tokens, lim.max_stop_strings, lim.max_stop_string_len) == (3, 300, 4, 32)
    assert (lim.max_message_bytes, lim.max_prompt_tokens) == (2**20, 100)


def test_server_info_from_generated_stubs_and_the_async_client(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GenerateStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED        # behind the API key like the rest
        msg = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10,
                                 metadata=[("authorization", f"Bearer {API_KEY}")])
    assert msg.model == SERVED and msg.HasField("max_queue") and msg.limits.HasField("max_tokens")

    async def ask():
        async with AsyncClient(server.address, api_key=API_KEY) as c:
            return await c.server_info()
    assert asyncio.run(ask()).limits.max_prompt_tokens == 100


def test_unbounded_limits_are_left_unset(tiny_model_dir):
    with serving(tiny_model_dir, grace=1.0) as srv, srv.client() as c:
        info = c.server_info()
        assert info.max_queue is None and info.limits.max_tokens is None and info.limits.max_prompt_tokens is None
        assert info.model == srv.engine.model_info.model              # no --served-model-name


# -- GetStats: waiting prompt tokens, running tokens ------------------------------------------

def test_stats_count_waiting_prompt_tokens_and_running_tokens(server, client):
    """One running at most (max_num_seqs=1): the second request waits with its whole prompt."""
    first = client.generate(prompt_token_ids=list(range(1, 21)), max_tokens=250, ignore_eos=True, temperature=0)
    next(first)                                     # running now
    got = []
    second = threading.Thread(target=lambda: got.append(client.generate_text(
        prompt_token_ids=list(range(1, 13)), max_tokens=2, ignore_eos=True, temperature=0)), daemon=True)
    second.start()
    end = time.monotonic() + 20
    while True:
        stats = client.stats()
        if stats.num_waiting == 1 or time.monotonic() > end:
            break
        time.sleep(0.005)
    assert stats.num_running == 1 and stats.num_waiting == 1
    assert stats.num_waiting_prompt_tokens == 12
    assert 21 <= stats.num_running_tokens <= 20 + 250
    first.close()                                   # cancelled: the waiting one runs
    second.join(timeout=20)
    assert got, "the waiting request ran once the first was cancelled"
    end = time.monotonic() + 10
    while (stats := client.stats()).num_running and time.monotonic() < end:
        time.sleep(0.01)
    assert stats.num_running_tokens == 0 and stats.num_waiting_prompt_tokens == 0


def test_llm_engine_stats_token_counts(tiny_model_dir):
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(tiny_engine_args(tiny_model_dir, max_num_seqs=1))
    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)
    engine.add_request("a", prompt_token_ids=list(range(1, 11)), sampling_params=params)
    engine.add_request("b", prompt_token_ids=list(range(1, 8)), sampling_params=SamplingParams(n=2, max_tokens=1))
    assert (engine.get_stats().num_waiting_prompt_tokens, engine.get_stats().num_running_tokens) == (10 + 2 * 7, 0)
    engine.step()                                   # "a" prefilled and sampled its first token
    stats = engine.get_stats()
    assert (stats.num_running_tokens, stats.num_waiting_prompt_tokens) == (11, 2 * 7)


# -- HTTP /version, /tokenize, /detokenize -------------------------------------------------

def test_version_is_open_and_names_the_release(server):
    resp = httpx.get(f"http://127.0.0.1:{server.server.openai_port}/version", timeout=10)
    assert resp.status_code == 200 and resp.json() == {"version": importlib.metadata.version("pagedgen")}


def test_tokenize_a_prompt_as_grpc_does(server, client):
    text = "The cat watches the morning light"
    body = server.http.post("/tokenize", json={"model": SERVED, "prompt": text}).json()
    ids = client.tokenize(text)
    assert body["tokens"] == ids and body["count"] == len(ids) and body["token_strs"] is None
    assert body["max_model_len"] == client.model_info().max_model_len
    plain = server.http.post("/tokenize", json={"prompt": text, "add_special_tokens": False,
                                                "return_token_strs": True}).json()
    assert plain["tokens"] == server.engine.tokenizer.encode(text, add_special_tokens=False)
    assert len(plain["token_strs"]) == plain["count"] and all(isinstance(s, str) for s in plain["token_strs"])


def test_tokenize_messages_as_a_chat_completion_renders_them(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    body = server.http.post("/tokenize", json={"messages": messages}).json()
    assert body["tokens"] == client.tokenize(messages=messages)
    completion = server.http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
    assert completion["usage"]["prompt_tokens"] == body["count"]
    no_prompt = server.http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert no_prompt["count"] < body["count"] and body["tokens"][:no_prompt["count"]] == no_prompt["tokens"]


def test_detokenize_round_trips_and_keeps_special_tokens(server, client):
    text = "A small robot builds a paper boat"
    ids = server.engine.tokenizer.encode(text, add_special_tokens=False)
    assert server.http.post("/detokenize", json={"model": SERVED, "tokens": ids}).json() == {"prompt": text}
    eos = client.model_info().eos_token_ids[0]
    with_eos = server.http.post("/detokenize", json={"tokens": ids + [eos]}).json()["prompt"]
    assert with_eos.startswith(text) and len(with_eos) > len(text)


@pytest.mark.parametrize("path, body, status, param", [
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "model"),
    ("/tokenize", {"prompt": "x", "bogus": 1}, 400, None),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
])
def test_bad_tokenize_requests_say_what_to_fix(server, path, body, status, param):
    resp = server.http.post(path, json=body)
    assert resp.status_code == status, resp.text
    if param is not None:
        assert resp.json()["error"]["param"] == param


def test_tokenize_needs_the_api_key(server):
    resp = httpx.post(f"http://127.0.0.1:{server.server.openai_port}/tokenize", json={"prompt": "x"}, timeout=10)
    assert resp.status_code == 401
