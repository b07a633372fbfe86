"""One meaning everywhere: what the gRPC and the OpenAI HTTP API both say,
checked on the same real server (tiny model) through generated stubs, the
client library and the official ``openai`` client."""

from __future__ import annotations

import json
import shutil
import time

import grpc
import httpx
import openai
import pytest
from structlog.testing import capture_logs

from common.errors import DuplicateRequestError
from pagedgen_client import PagedgenClientError
from service.limits import RequestLimits
from service.openai.errors import error_of
from service.server import ServerOptions
from tests.service.conftest import ServerThread, serving
from tests.service.test_metrics import delta, scrape, scrape_until

pytestmark = pytest.mark.timeout(120)

SERVED = "served-tiny"
MAX_MODEL_LEN = 48
MAX_OUTPUT = 40             # --max-output-tokens: binds a short prompt (48 - 3 > 40), not a long one
SHORT, LONG_PROMPT = "Hi", "The cat watches the morning light over the quiet harbour"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    options = ServerOptions(port=0, openai_port=0, metrics_port=0, served_model_name=SERVED,
                            limits=RequestLimits(max_n=2, max_tokens=MAX_OUTPUT))
    with serving(tiny_model_dir, options, max_model_len=MAX_MODEL_LEN) as srv, \
            openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key="unused", max_retries=0, timeout=60) as srv.openai:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


# -- an unset max_tokens -------------------------------------------------------------------

@pytest.mark.parametrize("prompt", [SHORT, LONG_PROMPT])
def test_unset_max_tokens_means_up_to_the_context_capped_over_both_apis(server, client, prompt):
    chunks = list(client.generate(prompt, temperature=0, ignore_eos=True))
    usage = chunks[-1].usage
    expected = min(MAX_OUTPUT, MAX_MODEL_LEN - usage.prompt_tokens)
    assert usage.completion_tokens == expected and chunks[-1].finish_reason == "length"
    http = server.openai.completions.create(model=SERVED, prompt=prompt, temperature=0, extra_body={"ignore_eos": True})
    assert http.usage.completion_tokens == expected and http.choices[0].finish_reason == "length"
    assert http.choices[0].text == "".join(c.text for c in chunks)


def test_unset_max_tokens_in_chat_agrees_too(server, client):
    messages = [{"role": "user", "content": SHORT}]
    chunks = list(client.generate(messages=messages, temperature=0, ignore_eos=True))
    http = server.openai.chat.completions.create(model=SERVED, messages=messages, temperature=0,
                                                 extra_body={"ignore_eos": True})
    assert http.usage.completion_tokens == chunks[-1].usage.completion_tokens
    assert http.choices[0].message.content == "".join(c.text for c in chunks)


def test_min_tokens_over_the_output_cap_is_refused_naming_it(server, client):
    with pytest.raises(PagedgenClientError) as info:
        list(client.generate(SHORT, min_tokens=MAX_OUTPUT + 1))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "sampling.min_tokens" in info.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        server.openai.completions.create(model=SERVED, prompt=SHORT, extra_body={"min_tokens": MAX_OUTPUT + 1})
    assert bad.value.body["param"] == "min_tokens"


# -- the served model name -----------------------------------------------------------------

def test_served_model_name_is_what_both_apis_report(server, client):
    info = client.model_info()
    assert info.model == SERVED == client.server_info().model
    assert info.loaded_model == server.engine.model_info.model != SERVED
    assert [m.id for m in server.openai.models.list().data] == [SERVED]
    reply = server.openai.completions.create(model=server.engine.args.model, prompt=SHORT, max_tokens=1)
    assert reply.model == SERVED                     # the --model path is accepted, the served name reported


# -- a second in-flight request with the same id -------------------------------------------

def test_a_duplicate_in_flight_request_id_is_already_exists(tiny_server, tiny_client):
    first = tiny_client.generate("The cat watches", request_id="dup", max_tokens=480, ignore_eos=True)
    try:
        assert next(first).request_id == "dup"
        with pytest.raises(PagedgenClientError) as info:
            list(tiny_client.generate("Another prompt", request_id="dup", max_tokens=2))
        assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert "'dup'" in info.value.message and "in flight" in info.value.message
        assert next(first).request_id == "dup"       # the first one runs on, untouched
    finally:
        first.close()
    # Once the first one is gone, its id is free again.
    for _ in range(100):
        try:
            assert tiny_client.generate_text("Again", request_id="dup", max_tokens=2, ignore_eos=True)
            break
        except PagedgenClientError as e:            # the cancel reaches the engine within a step
            assert e.code == grpc.StatusCode.ALREADY_EXISTS
    else:
        raise AssertionError("the id never became free")


def test_a_duplicate_request_id_is_409_over_http():
    status, body = error_of(DuplicateRequestError("request_id 'x' is already in use by a request in flight"))
    assert status == 409 and body.error.type == "invalid_request_error" and body.error.code == "request_id_in_use"


def test_a_duplicate_x_request_id_is_409_over_http(tiny_model_dir):
    """Live, once the HTTP API honours X-Request-Id as the request id."""
    with serving(tiny_model_dir, ServerOptions(port=0, openai_port=0), grace=1.0) as srv:
        base = srv.http_url
        body = {"prompt": "The cat watches", "max_tokens": 480, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=base, timeout=30) as http, \
                http.stream("POST", "/v1/completions", json=body, headers={"x-request-id": "same"}) as first:
            if first.headers.get("x-request-id") != "same":
                pytest.skip("this server does not honour X-Request-Id yet")
            lines = first.iter_lines()          # held: a dropped iterator closes the stream
            assert next(lines).startswith("data: ")
            second = http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2},
                               headers={"x-request-id": "same"})
            assert second.status_code == 409, second.text


# -- an EOS stop reports its token id --------------------------------------------------------

@pytest.fixture(scope="module")
def eos_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its greedy first answer token to "Hello" made an end-of-sequence id."""
    from engine import LLM, SamplingParams

    llm = LLM(model=tiny_model_dir, backend="cpu", num_kv_blocks=64)
    first = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].outputs[0]
    path = tmp_path_factory.mktemp("eos-model") / "tiny"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    eos = config["eos_token_id"]
    config["eos_token_id"] = [*(eos if isinstance(eos, list) else [eos]), first.token_ids[1]]
    (path / "config.json").write_text(json.dumps(config))
    return str(path), first.token_ids[1]


def test_an_eos_stop_reports_its_token_id_over_grpc(eos_model_dir):
    from engine import LLM, SamplingParams
    from engine.async_engine import AsyncEngine

    path, eos = eos_model_dir
    llm = LLM(model=path, backend="cpu", num_kv_blocks=64)
    offline = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=5))[0].outputs[0]
    assert offline.finish_reason == "stop" and offline.token_ids[-1] == eos
    assert offline.stop_reason is None                      # offline keeps vLLM's meaning: None for EOS
    engine = AsyncEngine(llm.engine.args, engine=llm.engine)
    srv = ServerThread(engine, ServerOptions(port=0, openai_port=0))
    try:
        with srv.client() as c:
            last = list(c.generate("Hello", temperature=0, max_tokens=5))[-1]
            assert (last.finish_reason, last.stop_reason) == ("stop", eos)
            # An explicit stop token id still reports itself; a length stop reports none.
            last = list(c.generate("Hello", temperature=0, max_tokens=5, ignore_eos=True,
                                   stop_token_ids=[eos]))[-1]
            assert (last.finish_reason, last.stop_reason) == ("stop", eos)
            last = list(c.generate("Hello", temperature=0, max_tokens=1, ignore_eos=True))[-1]
            assert (last.finish_reason, last.stop_reason) == ("length", None)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server.openai_port}/v1", api_key="x",
                           max_retries=0) as oa:
            choice = oa.completions.create(model=None, prompt="Hello", temperature=0, max_tokens=5).choices[0]
        assert choice.finish_reason == "stop" and choice.model_extra.get("stop_reason") is None   # as vLLM
    finally:
        srv.stop(grace=1.0)
        engine.shutdown()


# -- HTTP requests in the outcome metrics and in --log-requests -------------------------------

def test_http_requests_count_in_the_outcome_metrics(server):
    before = scrape(server)
    oa = server.openai
    oa.completions.create(model=SERVED, prompt=SHORT, max_tokens=3, extra_body={"ignore_eos": True})
    stream = oa.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": SHORT}], max_tokens=2,
                                        stream=True, extra_body={"ignore_eos": True})
    assert [c for c in stream]
    with pytest.raises(openai.BadRequestError):
        oa.completions.create(model=SERVED, prompt=SHORT, n=3)           # over --max-n
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="no-such-model", prompt=SHORT)
    after = scrape_until(server, lambda s: delta(s, before, "pagedgen_request_failure_total", code="NOT_FOUND") >= 1)
    assert delta(after, before, "pagedgen_request_success_total", finish_reason="length") == 2
    assert delta(after, before, "pagedgen_request_failure_total", code="INVALID_ARGUMENT") == 1
    assert delta(after, before, "pagedgen_request_failure_total", code="NOT_FOUND") == 1


def test_log_requests_covers_http_requests(tiny_model_dir):
    with serving(tiny_model_dir, ServerOptions(port=0, openai_port=0, log_requests=True), grace=1.0) as srv:
        with openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key="x", max_retries=0) as oa, \
                capture_logs() as logs:
            reply = oa.completions.create(model=None, prompt="secret prompt", max_tokens=3, temperature=0)
            streamed = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(
                model=None, messages=[{"role": "user", "content": "chat secret"}], max_tokens=3, stream=True,
                temperature=0) if c.choices)
            # A stream is logged when its response ends on the server, which may be just after
            # the client has read the last event: wait for it.
            end = time.monotonic() + 10
            while sum(e["event"] == "http_request" for e in logs) < 2 and time.monotonic() < end:
                time.sleep(0.02)
        texts = [e for e in logs if e["event"] == "request_text"]
        completions = [e for e in logs if e["event"] == "request_completion_text"]
        assert [t["prompt"] for t in texts] == ["secret prompt", [{"role": "user", "content": "chat secret"}]]
        assert [c["completions"] for c in completions] == [[reply.choices[0].text], [streamed]]
        assert texts[0]["request_id"] == reply.id
        http = [e for e in logs if e["event"] == "http_request"]
        assert [(e["endpoint"], e["status"], e["finish_reasons"]) for e in http] == [
            ("completions", 200, ["length"]), ("chat", 200, ["length"])]
