"""Abort by id: gRPC's Abort rpc (generated stubs and the client), HTTP's X-Request-Id and /v1/abort."""

from __future__ import annotations

import threading
import time

import grpc
import httpx
import openai
import pytest

from pagedgen_client._proto.pagedgen.v1 import generate_pb2 as pb
from pagedgen_client._proto.pagedgen.v1 import generate_pb2_grpc as pb_grpc
from service.server import ServerOptions
from tests.service.conftest import serving

pytestmark = pytest.mark.timeout(120)

LONG = pb.SamplingParams(max_tokens=480, ignore_eos=True, temperature=0)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with serving(tiny_model_dir, ServerOptions(port=0, openai_port=0)) as srv:
        srv.http = srv.http_url
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GenerateStub(channel)


def _wait_idle(stub, timeout: float = 5.0) -> pb.GetStatsResponse:
    end = time.monotonic() + timeout
    while True:
        stats = stub.GetStats(pb.GetStatsRequest())
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_free == stats.kv_blocks_total:
            return stats
        assert time.monotonic() < end, f"never idle: {stats}"
        time.sleep(0.01)


def test_abort_rpc_ends_the_stream_with_abort_and_frees_its_blocks(stub):
    _wait_idle(stub)
    stream = stub.Generate(pb.GenerateRequest(request_id="victim", prompt="The cat watches", sampling=LONG))
    first = next(stream)
    assert first.request_id == "victim" and first.finish_reason == pb.FINISH_REASON_UNSPECIFIED
    resp = stub.Abort(pb.AbortRequest(request_ids=["victim", "nobody", "victim"]))
    assert list(resp.aborted_ids) == ["victim"]                       # unknown ids ignored, duplicates once
    rest = list(stream)
    assert rest[-1].finish_reason == pb.FINISH_REASON_ABORT
    assert rest[-1].usage.completion_tokens < 480
    _wait_idle(stub)
    assert list(stub.Abort(pb.AbortRequest(request_ids=["victim"])).aborted_ids) == []   # no longer in flight


def test_client_abort(server):
    with server.client() as client:
        stream = client.generate("A small robot", request_id="client-victim", max_tokens=480, ignore_eos=True)
        next(stream)
        assert client.abort("client-victim") == ["client-victim"]
        chunks = list(stream)
        assert chunks[-1].finish_reason == "abort"


def test_http_request_id_is_honoured_echoed_and_abortable(server, stub):
    _wait_idle(stub)
    with httpx.Client(base_url=server.http, timeout=60) as http:
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers={"X-Request-Id": "mine-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "mine-1" and r.json()["id"] == "mine-1"
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.headers["x-request-id"].startswith("cmpl-") and r.json()["id"] == r.headers["x-request-id"]
        r = http.post("/v1/completions", json={"prompt": "hi"}, headers={"X-Request-Id": "x" * 300})
        assert r.status_code == 400 and "X-Request-Id" in r.json()["error"]["message"]

    got: dict = {}

    def stream_it():
        with openai.OpenAI(base_url=f"{server.http}/v1", api_key="none", max_retries=0) as oa:
            events = oa.completions.create(model=None, prompt="Once upon", max_tokens=480, stream=True,
                                           temperature=0, extra_body={"ignore_eos": True},
                                           extra_headers={"X-Request-Id": "http-victim"})
            chunks = list(events)
            got["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices][-1]

    reader = threading.Thread(target=stream_it)
    reader.start()
    end = time.monotonic() + 10
    while stub.GetStats(pb.GetStatsRequest()).num_running == 0:
        assert time.monotonic() < end
        time.sleep(0.005)
    # gRPC's Abort and HTTP's /v1/abort reach the same ids.
    with httpx.Client(base_url=server.http, timeout=10) as http:
        r = http.post("/v1/abort", json={"request_ids": ["http-victim"]})
    assert r.status_code == 200 and r.json() == {"aborted_ids": ["http-victim"]}
    reader.join(timeout=30)
    assert got["finish"] == "abort"
    _wait_idle(stub)
