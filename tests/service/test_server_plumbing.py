"""The server over a scripted engine: streaming, status codes, cancellation,
deadlines, engine death, drain, auth, TLS, retries, health and reflection."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time

import grpc
import pytest
from structlog.testing import capture_logs

from common.errors import EngineShutdownError, InvalidRequestError, QueueFullError, RequestFailedError
from pagedgen_client import AsyncClient, Client, PagedgenClientError, RetryPolicy
from service.server import SERVICE_NAME, ServerOptions
from tests.service.conftest import ServerThread
from tests.service.fakes import FakeEngine

pytestmark = pytest.mark.timeout(60)


def _wait_for(predicate, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_stream_deltas_usage_and_chat(fake_client):
    chunks = list(fake_client.generate("abcd", request_id="r1", n=2, logprobs=1))
    assert {c.request_id for c in chunks} == {"r1"}
    for index in (0, 1):
        mine = [c for c in chunks if c.index == index]
        assert "".join(c.text for c in mine) == "dcba"
        assert [t for c in mine for t in c.token_ids] == [ord(ch) for ch in "dcba"]
        assert [c.finish_reason for c in mine] == [None, None, None, "length"]
        assert mine[-1].usage.prompt_tokens == 4 and mine[-1].usage.completion_tokens == 4
        assert all(len(c.logprobs) == 1 and len(c.logprobs[0].top) == 1 for c in mine)
    assert fake_client.generate_text("xyz") == "zyx"
    assert fake_client.generate_text("xyz", n=2) == ["zyx", "zyx"]
    assert fake_client.generate_text(prompt_token_ids=[ord("h"), ord("i")]) == "ih"
    chat = fake_client.generate_text(messages=[{"role": "user", "content": "hey"}], max_tokens=100)
    assert chat == "<user>hey<assistant>"[::-1]
    assert all(c.token_ids == [] for c in fake_client.generate("ab", return_token_ids=False))


def test_server_assigns_request_ids(fake_client):
    ids = {next(iter(fake_client.generate("ab"))).request_id for _ in range(3)}
    assert len(ids) == 3 and all(ids)


@pytest.mark.parametrize("error, code", [
    (InvalidRequestError("prompt_token_ids contains 99, outside the vocabulary"), grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError("request queue is full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineShutdownError("server is shutting down"), grpc.StatusCode.UNAVAILABLE),
    (RequestFailedError("rX", "nan"), grpc.StatusCode.INTERNAL),
    (RuntimeError("unexpected"), grpc.StatusCode.INTERNAL),
])
def test_engine_errors_become_status_codes(fake_engine, fake_server, error, code):
    fake_engine.fail_with = error
    with fake_server.client(retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(PagedgenClientError) as info:
            list(client.generate("ab", request_id="rX"))
        assert info.value.code == code
        if code == grpc.StatusCode.INTERNAL:
            assert "rX" in info.value.message
        fake_engine.fail_with = None
        assert client.generate_text("ab") == "ba"          # still serving


def test_invalid_arguments_never_reach_the_engine(fake_engine, fake_client):
    with pytest.raises(PagedgenClientError) as info:
        list(fake_client.generate("ab", temperature=-1))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message.startswith("sampling.temperature")
    with pytest.raises(PagedgenClientError, match="INVALID_ARGUMENT: prompt must not be empty"):
        list(fake_client.generate(""))
    assert fake_engine.num_generate_calls == 0


def test_cancel_closes_the_engine_stream(fake_engine, fake_client):
    fake_engine.step_s = 0.05
    stream = fake_client.generate("x" * 60, request_id="cancel-me", max_tokens=60)
    assert [next(stream).text for _ in range(3)] == ["x", "x", "x"]
    stream.close()
    assert _wait_for(lambda: "cancel-me" in fake_engine.aborted)
    assert not fake_engine.running


def test_deadline_aborts_the_request(fake_engine, fake_client):
    fake_engine.step_s = 0.05
    start = time.time()
    with pytest.raises(PagedgenClientError) as info:
        list(fake_client.generate("y" * 60, request_id="late", max_tokens=60, timeout=0.3))
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert start < fake_engine.deadlines["late"] <= start + 0.5      # passed on, wall clock
    assert _wait_for(lambda: "late" in fake_engine.aborted)


def test_engine_death_fails_the_stream_and_health(fake_engine, fake_server, fake_client):
    assert fake_client.health() == "SERVING" and fake_client.health(SERVICE_NAME) == "SERVING"
    fake_engine.fail_after = 2
    with pytest.raises(PagedgenClientError) as info:
        list(fake_client.generate("abcdef", request_id="doomed"))
    assert info.value.code == grpc.StatusCode.INTERNAL and "doomed" in info.value.message
    assert _wait_for(lambda: fake_client.health() == "NOT_SERVING")
    assert fake_client.health(SERVICE_NAME) == "NOT_SERVING"


def test_unavailable_is_retried_before_the_first_chunk_only(fake_engine, fake_server):
    retry = RetryPolicy(max_attempts=3, initial_backoff=0.01)
    with fake_server.client(retry=retry) as client:
        fake_engine.fail_with = EngineShutdownError("draining")
        with pytest.raises(PagedgenClientError) as info:
            list(client.generate("ab"))
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and fake_engine.num_generate_calls == 3
        fake_engine.fail_with, fake_engine.num_generate_calls = None, 0
        fake_engine.fail_after, fake_engine.fail_after_error = 1, EngineShutdownError("stopped")
        with pytest.raises(PagedgenClientError):
            list(client.generate("abc"))
        assert fake_engine.num_generate_calls == 1                   # a chunk had arrived: no retry


def test_unreachable_server_gives_unavailable_after_bounded_retries():
    with Client("127.0.0.1:1", retry=RetryPolicy(max_attempts=3, initial_backoff=0.05)) as client:
        start = time.monotonic()
        with pytest.raises(PagedgenClientError) as info:
            client.stats(timeout=5)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert 0.15 <= time.monotonic() - start < 5


def test_drain_lets_running_streams_finish_and_refuses_new_ones(fake_engine):
    fake_engine.step_s = 0.02
    server = ServerThread(fake_engine)
    client = server.client(retry=RetryPolicy(max_attempts=1))
    stream = client.generate("z" * 40, max_tokens=40)
    first = next(stream)
    stopped = threading.Thread(target=server.stop, kwargs={"grace": 10.0})
    stopped.start()
    assert _wait_for(lambda: fake_engine.draining)
    with pytest.raises(PagedgenClientError) as info:
        list(client.generate("ab"))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert first.text + "".join(c.text for c in stream) == "z" * 40
    stopped.join(timeout=15)
    assert not stopped.is_alive()
    client.close()


def test_health_reflection_tokenize_and_info(fake_server, fake_client):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(fake_server.address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
    assert fake_client.tokenize("hi") == [104, 105]
    assert fake_client.tokenize(messages=[{"role": "user", "content": "x"}]) == [ord(c) for c in "<user>x<assistant>"]
    assert fake_client.detokenize([104, 105]) == "hi"
    info = fake_client.model_info()
    assert (info.model, info.block_size, info.num_kv_blocks, info.backend) == ("fake", 16, 64, "cpu")
    assert fake_client.stats().kv_blocks_total == 64
    with pytest.raises(PagedgenClientError, match=r"INVALID_ARGUMENT: chat\.messages"):
        fake_client.tokenize(messages=[])


def test_api_key(fake_engine):
    server = ServerThread(fake_engine, ServerOptions(port=0, api_key="s3cret"))
    try:
        with server.client() as anonymous, server.client(api_key="s3cret") as member:
            assert anonymous.health() == "SERVING"                  # probes need no key
            with pytest.raises(PagedgenClientError) as info:
                list(anonymous.generate("ab"))
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(PagedgenClientError, match="UNAUTHENTICATED"):
                anonymous.stats()
            assert member.generate_text("ab") == "ba"
            assert member.stats(metadata=[("x-trace", "1")]).kv_blocks_total == 64
    finally:
        server.stop(0.5)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _make_pki(d) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 / localhost and a client certificate."""
    paths = {name: str(d / f"{name}.pem") for name in ("ca", "ca_key", "server", "server_key", "client", "client_key")}
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", paths["ca_key"], "-out", paths["ca"],
             "-days", "1", "-subj", "/CN=test-ca")
    ext = d / "san.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, cn in (("server", "localhost"), ("client", "test-client")):
        csr = str(d / f"{name}.csr")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", paths[f"{name}_key"], "-out", csr, "-subj", f"/CN={cn}")
        _openssl("x509", "-req", "-in", csr, "-CA", paths["ca"], "-CAkey", paths["ca_key"], "-CAcreateserial",
                 "-out", paths[name], "-days", "1", *(["-extfile", str(ext)] if name == "server" else []))
    return paths


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_and_mutual_tls(fake_engine, tmp_path):
    pki = _make_pki(tmp_path)
    server = ServerThread(fake_engine, ServerOptions(port=0, tls_cert_file=pki["server"], tls_key_file=pki["server_key"]))
    try:
        with server.client(root_certificates=pki["ca"]) as client:
            assert client.generate_text("tls") == "slt"
        with server.client(retry=RetryPolicy(max_attempts=1)) as plaintext:
            with pytest.raises(PagedgenClientError):
                plaintext.stats(timeout=2)
    finally:
        server.stop(0.5)
    mutual = ServerThread(FakeEngine(), ServerOptions(port=0, tls_cert_file=pki["server"], tls_key_file=pki["server_key"],
                                                     tls_client_ca_file=pki["ca"]))
    try:
        with mutual.client(root_certificates=pki["ca"], private_key=pki["client_key"],
                           certificate_chain=pki["client"]) as client:
            assert client.generate_text("mtls") == "sltm"
        with mutual.client(root_certificates=pki["ca"], retry=RetryPolicy(max_attempts=1)) as anonymous:
            with pytest.raises(PagedgenClientError):
                anonymous.stats(timeout=2)
    finally:
        mutual.stop(0.5)


def test_async_client(fake_server):
    async def run():
        async with AsyncClient(fake_server.address) as client:
            chunks = [c async for c in client.generate("abc")]
            assert "".join(c.text for c in chunks) == "cba" and chunks[-1].usage.completion_tokens == 3
            assert await client.generate_text("abc", n=2) == ["cba", "cba"]
            assert await client.tokenize("a") == [97]
            assert await client.detokenize([97]) == "a"
            assert (await client.model_info()).model == "fake"
            assert (await client.stats()).kv_blocks_total == 64
            assert await client.health() == "SERVING"
            with pytest.raises(PagedgenClientError, match="INVALID_ARGUMENT"):
                await client.generate_text("abc", top_p=3)

    asyncio.run(run())


def test_one_finish_event_per_request_without_prompt_text(fake_client):
    with capture_logs() as events:
        fake_client.generate_text("very private words", request_id="logged", max_tokens=5)
        assert _wait_for(lambda: any(e["event"] == "request_finished" for e in events))
    finished = [e for e in events if e["event"] == "request_finished"]
    assert len(finished) == 1
    event = finished[0]
    assert (event["request_id"], event["status"], event["prompt_tokens"], event["completion_tokens"]) == \
        ("logged", "ok", 18, 5)
    assert event["ttft_ms"] is not None and event["duration_ms"] >= event["ttft_ms"]
    assert not any("private" in str(v) for e in events for v in e.values())


def test_not_serving_until_the_engine_is_attached(fake_engine):
    server = ServerThread(None)
    try:
        with server.client(retry=RetryPolicy(max_attempts=1)) as client:
            assert client.health() == "NOT_SERVING" and client.health(SERVICE_NAME) == "NOT_SERVING"
            with pytest.raises(PagedgenClientError) as info:
                list(client.generate("ab"))
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and "loading" in info.value.message
            server.call(server.server.attach(fake_engine))
            assert client.health() == "SERVING"
            assert client.generate_text("ab") == "ba"
    finally:
        server.stop(0.5)


def test_calls_without_a_deadline_pass_none_to_the_engine(fake_engine, fake_client):
    fake_client.generate_text("ab", request_id="no-deadline")
    assert fake_engine.deadlines["no-deadline"] is None
