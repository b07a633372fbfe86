"""Request limits, the exposure warning and request-text logging, on a real
server over the tiny model (and the ``pagedgen serve`` flags that set them)."""

from __future__ import annotations

import grpc
import pytest
from structlog.testing import capture_logs

from pagedgen_client import PagedgenClientError
from pagedgen_client._proto.pagedgen.v1 import generate_pb2 as pb
from cli import main as cli
from service.limits import DEFAULT_MAX_MESSAGE_BYTES, RequestLimits, exposure_warning, is_loopback
from service.server import SERVICE_NAME, ServerOptions
from tests.service.conftest import serving

pytestmark = pytest.mark.timeout(60)

LIMITS = RequestLimits(max_n=2, max_tokens=8, max_stop_strings=2, max_stop_string_len=5)


@pytest.fixture(scope="module")
def limited(tiny_model_dir):
    with serving(tiny_model_dir, ServerOptions(port=0, limits=LIMITS, max_message_bytes=4096), grace=0.5,
                 num_kv_blocks=64, max_prompt_tokens=20) as server:
        yield server


@pytest.mark.parametrize("kwargs, says", [
    (dict(n=3), ["sampling.n is 3", "at most 2", "--max-n"]),
    (dict(max_tokens=9), ["sampling.max_tokens is 9", "at most 8", "--max-output-tokens"]),
    (dict(stop=["a", "b", "c"]), ["sampling.stop is 3 strings", "at most 2", "--max-stop-strings"]),
    (dict(stop=["abcdef"]), ["a string of 6 characters", "at most 5", "--max-stop-string-len"]),
    (dict(prompt_token_ids=list(range(21))), ["prompt has 21 tokens", "at most 20", "--max-prompt-tokens"]),
    (dict(prompt="The cat watches the morning light. " * 4), ["at most 20", "--max-prompt-tokens"]),
    (dict(temperature=float("nan")), ["sampling.temperature must be a finite number"]),
    (dict(repetition_penalty=float("inf")), ["sampling.repetition_penalty must be a finite number"]),
])
def test_over_a_limit_is_invalid_argument_saying_what_to_fix(limited, kwargs, says):
    kwargs = {"prompt": "hi", **kwargs} if "prompt_token_ids" not in kwargs else kwargs
    with limited.client() as client, pytest.raises(PagedgenClientError) as info:
        list(client.generate(**kwargs))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    for words in says:
        assert words in info.value.message


def test_at_the_limits_is_served(limited):
    with limited.client() as client:
        texts = client.generate_text(prompt_token_ids=list(range(20)), n=2, max_tokens=8, stop=["abcde", "x"],
                                     ignore_eos=True, temperature=0)
        assert len(texts) == 2
        # Unset max_tokens: the limit, not the engine's default of 16, and no error.
        chunks = list(client.generate("hi", ignore_eos=True, temperature=0))
        assert sum(len(c.token_ids) for c in chunks) == 8 and chunks[-1].finish_reason == "length"
        assert client.stats().kv_blocks_free == client.stats().kv_blocks_total


def test_a_message_over_max_message_bytes_is_resource_exhausted(limited):
    with grpc.insecure_channel(limited.address) as channel:
        call = channel.unary_stream(f"/{SERVICE_NAME}/Generate",
                                    request_serializer=pb.GenerateRequest.SerializeToString)
        with pytest.raises(grpc.RpcError) as info:
            list(call(pb.GenerateRequest(prompt="x" * 5000), timeout=5))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_undecodable_bytes_are_invalid_argument_not_unknown(limited):
    with grpc.insecure_channel(limited.address) as channel:
        for method in ("Generate", "Tokenize"):
            rpc = (channel.unary_stream if method == "Generate" else channel.unary_unary)(f"/{SERVICE_NAME}/{method}")
            with pytest.raises(grpc.RpcError) as info:
                result = rpc(b"\x12\x02\xff\xfe", timeout=5)          # field 2 (prompt): bad UTF-8
                list(result) if method == "Generate" else result
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "does not parse" in info.value.details()


def test_loopback_and_the_exposure_warning():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.internal"))
    assert exposure_warning("127.0.0.1", has_api_key=False, has_tls=False) is None
    assert exposure_warning("0.0.0.0", has_api_key=True, has_tls=False) is None
    plain = exposure_warning("0.0.0.0", has_api_key=False, has_tls=False)
    assert "without an API key or TLS" in plain and "--api-key and --tls-cert" in plain
    assert "set --api-key," in exposure_warning("::", has_api_key=False, has_tls=True)


def test_request_text_is_logged_only_when_asked(tiny_model_dir):
    for log_requests in (False, True):
        with serving(tiny_model_dir, ServerOptions(port=0, log_requests=log_requests), grace=0.5,
                     num_kv_blocks=32) as server, capture_logs() as events, server.client() as client:
            text = client.generate_text("The quiet engineer paints", request_id="logged", max_tokens=6,
                                        ignore_eos=True, temperature=0)
            server.call(_settle())
        logged = " ".join(str(v) for e in events for v in e.values())
        assert ("quiet engineer" in logged) == log_requests
        assert (text in logged) == log_requests
        assert sum(e["event"] == "request_finished" for e in events) == 1


async def _settle():
    """Let the server's event loop run the handler's last lines (its finally)."""
    import asyncio
    await asyncio.sleep(0.05)


def test_serve_flags_and_defaults():
    args = cli.build_parser().parse_args(["serve"])
    assert (args.max_message_bytes, args.max_n, args.max_output_tokens, args.max_stop_strings,
            args.max_stop_string_len, args.max_prompt_tokens, args.max_queue, args.log_requests,
            args.host) == (DEFAULT_MAX_MESSAGE_BYTES, 16, None, 16, 256, None, 1024, False, "127.0.0.1")
    assert cli.DEFAULT_MAX_MESSAGE_BYTES == DEFAULT_MAX_MESSAGE_BYTES
    defaults = RequestLimits()
    assert (defaults.max_n, defaults.max_tokens, defaults.max_stop_strings, defaults.max_stop_string_len) == \
        (args.max_n, args.max_output_tokens, args.max_stop_strings, args.max_stop_string_len)
    args = cli.build_parser().parse_args(["serve", "--max-message-bytes", "1MiB", "--max-n", "4",
                                          "--max-output-tokens", "512", "--max-prompt-tokens", "2000",
                                          "--log-requests"])
    assert (args.max_message_bytes, args.max_n, args.max_output_tokens, args.max_prompt_tokens, args.log_requests) \
        == (2**20, 4, 512, 2000, True)
    with pytest.raises(ValueError, match="max_n"):
        RequestLimits(max_n=0)


def test_console_tracebacks_show_no_local_variables():
    """rich prints locals by default; a handler's locals hold the prompt."""
    import sys

    import structlog

    from service.logging import _no_locals

    def handler(request_text):
        raise RuntimeError("boom")

    secret = "tpmorp etavirp yrev ym"[::-1]      # not in the source lines the traceback shows
    try:
        handler(secret)
    except RuntimeError:
        exc_info = sys.exc_info()
    renderer = structlog.dev.ConsoleRenderer(colors=False, exception_formatter=_no_locals())
    line = renderer(None, "error", {"event": "rpc_failed", "exc_info": exc_info})
    assert "RuntimeError" in line and "boom" in line
    assert secret not in line
    default = structlog.dev.ConsoleRenderer(colors=False)(None, "error", {"event": "rpc_failed", "exc_info": exc_info})
    assert secret in default or structlog.dev.rich is None     # what the default would leak
