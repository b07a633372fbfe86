"""The OpenAI-compatible HTTP API, driven by the official ``openai`` package.

Every test talks to a real server on a free loopback port: a real
AsyncEngine on the tiny random Llama behind ``PagedgenServer`` serving gRPC
and HTTP from one event loop; one slow test uses the default model.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import ssl
import threading
import time

import grpc
import httpx
import openai
import pytest

from pagedgen_client import PagedgenClientError
from service.limits import RequestLimits
from service.server import PagedgenServer, ServerOptions
from tests.service.conftest import ServerThread, serving, tiny_engine_args

pytestmark = pytest.mark.timeout(120)

API_KEY = "test-key"
MODEL = "tiny-llama"
PROMPTS = ["The cat watches the answer", "A small robot builds a paper boat", "My neighbour remembers"]
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
LONG = 480          # tokens that take the tiny model hundreds of steps (its context is 512)


def _openai(port: int, api_key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0, timeout=60)


def _start(engine, **options) -> ServerThread:
    server = ServerThread(engine, ServerOptions(port=0, openai_port=0, **options))
    server.http = server.http_url
    return server


@pytest.fixture(scope="module")
def http_server(tiny_model_dir):
    options = ServerOptions(port=0, openai_port=0, api_key=API_KEY, limits=RequestLimits(max_n=4, max_tokens=LONG))
    with serving(tiny_model_dir, options) as server:
        server.http = server.http_url
        server.model_dir = tiny_model_dir
        yield server


@pytest.fixture(scope="module")
def client(http_server):
    with _openai(http_server.server.openai_port) as c:
        yield c


def _wait_until_idle(engine, timeout: float = 5.0):
    """The engine holds no request and no block (cached-but-free blocks count as free)."""
    end = time.monotonic() + timeout
    while True:
        stats = engine.get_stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_free == stats.kv_blocks_total:
            return
        if time.monotonic() > end:
            raise AssertionError(f"engine still busy {timeout}s later: {stats}")
        time.sleep(0.02)


def _wait_for(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# -- happy paths ------------------------------------------------------------------

def test_models_health_and_a_chat_completion(http_server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{http_server.http}/health").status_code == 200          # no key needed
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, **GREEDY)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == MODEL
    [choice] = resp.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    with http_server.client(api_key=API_KEY) as grpc_client:           # same engine, same template
        assert choice.message.content == grpc_client.generate_text(messages=messages, max_tokens=12,
                                                                   temperature=0, ignore_eos=True)
        assert resp.usage.prompt_tokens == len(grpc_client.tokenize(messages=messages))
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, **GREEDY)
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.prompt_tokens_details.cached_tokens >= 16        # a full block from the prefix cache


def test_streamed_chat_joins_to_the_non_streamed_text(client):
    messages = [{"role": "user", "content": "Tell me about the old river"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1 and "".join(content) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format_ends_with_done(http_server):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 5, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{http_server.http}/v1/completions", json=body,
                      headers={"authorization": f"Bearer {API_KEY}"}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and len(events) >= 2   # deltas the client had not read yet may merge
    assert '"usage"' not in "".join(events)                 # not asked for: no usage key at all


def test_completion_with_n_2_and_logprobs(client):
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[1], n=2, logprobs=3, max_tokens=8,
                                      temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert resp.object == "text_completion" and [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.completion_tokens == 16
    for choice in resp.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
        assert all(v <= 0 for v in lp.token_logprobs)
        assert all(1 <= len(top) <= 3 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)
        assert all(v <= max(top.values()) + 1e-5 for v, top in zip(lp.token_logprobs, lp.top_logprobs))
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    same = client.completions.create(model=MODEL, prompt=PROMPTS[1], n=2, logprobs=3, max_tokens=8,
                                      temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert [c.text for c in same.choices] == [c.text for c in resp.choices]          # seeded: reproducible


def test_greedy_logprobs_rank_the_chosen_token_first(client):
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          logprobs=True, top_logprobs=2, **GREEDY)
    content = resp.choices[0].logprobs.content
    assert len(content) == 6
    assert all(t.top_logprobs[0].token == t.token and len(t.top_logprobs) == 2 for t in content)
    assert all(bytes(t.bytes).decode(errors="replace") == t.token for t in content)


def test_batched_token_id_prompts_equal_their_solo_answers(http_server, client):
    with http_server.client(api_key=API_KEY) as grpc_client:
        ids = [grpc_client.tokenize(p) for p in PROMPTS[:2]]
    batch = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, n=2, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    solo = [client.completions.create(model=MODEL, prompt=p, max_tokens=10, **GREEDY).choices[0].text
            for p in PROMPTS[:2]]
    assert [c.text for c in batch.choices] == [solo[0], solo[0], solo[1], solo[1]]       # greedy: n copies
    assert batch.usage.prompt_tokens == sum(len(i) for i in ids) and batch.usage.completion_tokens == 40


def test_stop_string_ends_the_text_before_it(client):
    full = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=24, **GREEDY).choices[0].text
    stop = next(full[i:i + 2] for i in range(6, len(full) - 2) if full[i:i + 2].strip())
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=24, stop=[stop], **GREEDY)
    [choice] = resp.choices
    assert choice.finish_reason == "stop" and choice.text == full[:full.index(stop)]
    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=24, stop=stop, stream=True,
                                         **GREEDY)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_greedy_over_http_equals_grpc_and_offline(http_server, client):
    from engine import LLM, SamplingParams

    llm = LLM(model=http_server.model_dir, backend="cpu", num_kv_blocks=256)
    try:
        offline = [o.outputs[0] for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20))]
    finally:
        getattr(llm, "shutdown", lambda: None)()
    with http_server.client(api_key=API_KEY) as grpc_client:
        over_grpc = [grpc_client.generate_text(p, temperature=0, max_tokens=20) for p in PROMPTS]
    over_http = [client.completions.create(model=MODEL, prompt=p, max_tokens=20, temperature=0) for p in PROMPTS]
    assert [r.choices[0].text for r in over_http] == over_grpc == [o.text for o in offline]
    assert [r.usage.completion_tokens for r in over_http] == [len(o.token_ids) for o in offline]


# -- errors -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, param, says", [
    (dict(temperature=-1), "temperature", "temperature must be >= 0"),
    (dict(top_p=1.5), "top_p", "top_p must be in (0, 1]"),
    (dict(n=0), "n", "n must be an integer >= 1"),
    (dict(n=5), "n", "n is 5, but this server allows at most 4 (pagedgen serve --max-n)"),
    (dict(max_tokens=LONG + 1), "max_tokens", f"max_tokens is {LONG + 1}, but this server allows at most {LONG}"),
    (dict(extra_body={"min_tokens": 9}), "min_tokens", "min_tokens must be <= max_tokens"),
    (dict(extra_body={"colour": "red"}), "colour", "Unrecognized request argument supplied: colour"),
    (dict(prompt=[]), "prompt", "prompt must not be empty"),
    (dict(prompt=[10**6]), None, "outside the vocabulary"),
    (dict(prompt="word " * 600), None, "shorten the prompt"),
    (dict(temperature="hot"), "temperature", "temperature: Input should be a valid number"),
    (dict(echo=True, stream=True), "echo", "echo is not supported with stream"),
])
def test_invalid_arguments_get_400_saying_what_to_fix(client, kwargs, param, says):
    request = dict(model=MODEL, prompt="hello", max_tokens=4) | kwargs
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**request)
    assert info.value.status_code == 400
    assert info.value.body["type"] == "invalid_request_error" and info.value.body["param"] == param
    assert says in info.value.body["message"]


def test_invalid_chat_arguments_get_400(client):
    for kwargs, says in [(dict(messages=[]), "messages must hold at least one message"),
                         (dict(messages=[{"role": "user"}], top_logprobs=2), "top_logprobs needs logprobs: true"),
                         (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                          "only text parts are supported"),
                         (dict(messages=[{"role": "user", "content": "x"}], max_completion_tokens=0),
                          "max_completion_tokens must be a positive integer"),
                         (dict(messages=[{"role": "user", "content": "x"}], max_completion_tokens=LONG + 1),
                          "max_completion_tokens is 481, but this server allows at most 480")]:
        with pytest.raises(openai.BadRequestError, match=None) as info:
            client.chat.completions.create(model=MODEL, **kwargs)
        assert says in info.value.body["message"], kwargs


def test_wrong_or_missing_key_gets_401(http_server):
    with _openai(http_server.server.openai_port, api_key="wrong") as stranger:
        with pytest.raises(openai.AuthenticationError) as info:
            stranger.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    resp = httpx.get(f"{http_server.http}/v1/models")
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "invalid_request_error"
    with http_server.client(api_key="wrong") as grpc_stranger:      # the same key guards gRPC
        with pytest.raises(PagedgenClientError) as grpc_info:
            grpc_stranger.generate_text("hi", max_tokens=2)
        assert grpc_info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_unknown_model_and_route_get_404(http_server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404 and info.value.body["code"] == "model_not_found"
    assert info.value.body["param"] == "model" and MODEL in info.value.body["message"]
    resp = httpx.post(f"{http_server.http}/v1/embeddings", json={}, headers={"authorization": f"Bearer {API_KEY}"})
    assert resp.status_code == 404 and "error" in resp.json()


def test_queue_full_gets_429_and_draining_gets_503(tiny_model_dir):
    """One running and one waiting request fill a server of max_num_seqs=1, max_queue=1:
    the next gets 429. During the drain new requests get 503 and /health does too,
    while the two accepted requests finish."""
    from engine.async_engine import AsyncEngine

    engine = AsyncEngine(tiny_engine_args(tiny_model_dir, max_num_seqs=1, max_queue=1))
    server = _start(engine)
    port = server.server.openai_port
    results = {}

    def stream_all(name):
        with _openai(port) as c:
            chunks = list(c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=200, stream=True,
                                               stream_options={"include_usage": True}, **GREEDY))
        results[name] = chunks

    threads = [threading.Thread(target=stream_all, args=(name,)) for name in ("running", "waiting")]
    try:
        with _openai(port) as c:
            threads[0].start()
            _wait_for(lambda: engine.get_stats().num_running == 1)
            threads[1].start()
            _wait_for(lambda: engine.get_stats().num_waiting == 1)
            with pytest.raises(openai.RateLimitError) as info:
                c.completions.create(model=MODEL, prompt="hi", max_tokens=2)
            assert info.value.status_code == 429 and info.value.body["type"] == "rate_limit_error"

            drained = asyncio.run_coroutine_threadsafe(server.server.stop(30.0), server.loop)
            _wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/health").status_code == 503)
            with pytest.raises(openai.InternalServerError) as info:
                c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
            assert info.value.status_code == 503 and "shutting down" in info.value.body["message"]
            assert drained.result(timeout=60) is True
        for t in threads:
            t.join(timeout=30)
        texts = []
        for name in ("running", "waiting"):
            chunks = results[name]
            assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 200
            texts.append("".join(c.choices[0].text for c in chunks[:-1]))
        assert texts[0] == texts[1]                                 # greedy, same prompt
    finally:
        server.stop(grace=0.5)
        engine.shutdown()


def test_model_loading_gets_503_and_a_too_large_body_413():
    server = ServerThread(None, ServerOptions(port=0, openai_port=0, max_message_bytes=1000))
    try:
        base = f"http://127.0.0.1:{server.server.openai_port}"
        assert httpx.get(f"{base}/health").status_code == 503
        resp = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert resp.status_code == 503 and "still loading" in resp.json()["error"]["message"]
        resp = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x" * 2000})
        assert resp.status_code == 413 and "--max-message-bytes" in resp.json()["error"]["message"]
    finally:
        server.stop(grace=0.5)


def test_a_taken_port_fails_the_start_cleanly():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = PagedgenServer(None, ServerOptions(port=0, openai_port=taken.getsockname()[1]))
        with pytest.raises(OSError, match="cannot bind the OpenAI HTTP API"):
            asyncio.run(server.start())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_options_serve_https_too(tmp_path):
    from tests.service.test_server_plumbing import _make_pki

    pki = _make_pki(tmp_path)
    server = ServerThread(None, ServerOptions(port=0, openai_port=0, tls_cert_file=pki["server"],
                                              tls_key_file=pki["server_key"], tls_client_ca_file=pki["ca"]))
    try:
        url = f"https://127.0.0.1:{server.server.openai_port}/health"
        context = ssl.create_default_context(cafile=pki["ca"])
        context.load_cert_chain(pki["client"], pki["client_key"])
        assert httpx.get(url, verify=context).status_code == 503          # TLS works; the model is not loaded
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, verify=ssl.create_default_context(cafile=pki["ca"]))    # no client certificate
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https", "http"))
    finally:
        server.stop(grace=0.5)


# -- disconnects ----------------------------------------------------------------------

def test_disconnected_stream_aborts_its_request(http_server, client):
    engine = http_server.engine
    steps = engine.engine.num_steps
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go on"}],
                                            max_tokens=LONG, stream=True, **GREEDY)
    chunks = iter(stream)
    received = [next(chunks) for _ in range(3)]
    assert received[-1].choices[0].delta.content is not None
    stream.close()
    _wait_until_idle(engine)
    assert engine.engine.num_steps - steps < LONG - 100        # it did not run to its end


def test_disconnected_non_streamed_request_is_aborted(http_server):
    engine = http_server.engine
    steps = engine.engine.num_steps
    with pytest.raises(httpx.ReadTimeout):
        # 50 ms: a fast machine computes all LONG tokens of the tiny model in ~0.3 s
        httpx.post(f"{http_server.http}/v1/completions", timeout=httpx.Timeout(0.05, connect=10),
                   headers={"authorization": f"Bearer {API_KEY}"},
                   json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": LONG, "ignore_eos": True})
    _wait_until_idle(engine)
    assert engine.engine.num_steps - steps < LONG - 100


# -- the command line ---------------------------------------------------------------------

@pytest.mark.slow          # a process that imports torch: 10-30 s on a busy CI machine
def test_serve_cli_openai_port_and_api_key_from_the_environment(tiny_model_dir, monkeypatch):
    from tests.service.test_serve_process import ServeProcess

    monkeypatch.setenv("PAGEDGEN_API_KEY", "env-key")
    server = ServeProcess("--model", tiny_model_dir, "--backend", "cpu", "--num-kv-blocks", "64",
                          "--openai-port", "0", "--served-model-name", "tiny")
    try:
        ready = server.wait_event("server_ready", timeout=60)
        port = ready["openai_port"]
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        with _openai(port, api_key="env-key") as c:
            assert [m.id for m in c.models.list().data] == ["tiny"]
            assert c.completions.create(model="tiny", prompt="hi", max_tokens=3, **GREEDY).usage.completion_tokens == 3
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
        server.wait_event("server_stopped", timeout=5)
    finally:
        server.kill()


# -- the default model ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_greedy_over_http_equals_grpc_and_offline_on_the_default_model():
    """Offline first, then the same loaded engine behind both servers (one model load)."""
    from engine import LLM, SamplingParams
    from engine.async_engine import AsyncEngine

    prompts = ["The capital of France is", "def fibonacci(n):"]
    messages = [{"role": "user", "content": "What is 2+2? Answer briefly."}]
    llm = LLM(model=None, kv_cache_memory=128 << 20)
    params = SamplingParams(temperature=0, max_tokens=16)
    offline = [o.outputs[0].text for o in llm.generate(prompts, params)]
    offline_chat = llm.chat(messages, params)[0].outputs[0].text
    engine = AsyncEngine(llm.engine.args, engine=llm.engine)
    server = _start(engine)
    try:
        with server.client() as grpc_client, _openai(server.server.openai_port) as c:
            name = c.models.list().data[0].id
            assert name.startswith("SmolLM2")
            over_grpc = [grpc_client.generate_text(p, temperature=0, max_tokens=16) for p in prompts]
            over_http = [c.completions.create(model=name, prompt=p, temperature=0, max_tokens=16).choices[0].text
                         for p in prompts]
            chat = c.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=16)
        assert over_http == over_grpc == offline
        assert chat.choices[0].message.content == offline_chat and offline_chat.strip()
    finally:
        server.stop(grace=5.0)
        engine.shutdown()
