"""The synchronous client."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from . import _health, _request
from ._channel import DEFAULT_TARGET, ChannelConfig, Deadline, Metadata, Pem, RetryPolicy, is_retryable
from ._proto.pagedgen.v1 import generate_pb2 as pb
from ._proto.pagedgen.v1 import generate_pb2_grpc as pb_grpc
from .errors import PagedgenClientError
from .types import GenerateChunk, ModelInfo, ServerInfo, Stats, collect_texts

T = TypeVar("T")


class Client:
    """A blocking client of one pagedgen server.

    TLS is on when ``secure`` or any certificate is given (PEM bytes or a
    file path): ``root_certificates`` verifies the server (system roots when
    omitted), ``private_key`` + ``certificate_chain`` identify this client
    (mutual TLS). ``api_key`` is sent as ``authorization: Bearer KEY``;
    ``metadata`` goes with every call, each method takes more. ``options``
    are grpc channel arguments. UNAVAILABLE is retried per ``retry`` (only
    before a stream's first chunk). Use it as a context manager, or call
    ``close()``.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        secure: bool = False,
        root_certificates: Pem = None,
        private_key: Pem = None,
        certificate_chain: Pem = None,
        api_key: str | None = None,
        metadata: Metadata = (),
        options: Sequence[tuple[str, object]] = (),
        retry: RetryPolicy | None = None,
    ):
        self.config = ChannelConfig(target, secure, root_certificates, private_key, certificate_chain,
                                    api_key, tuple(metadata), tuple(options))
        self.retry = retry or RetryPolicy()
        self._channel = self.config.open_channel(grpc)
        self.stub = pb_grpc.GenerateStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- generation ---------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Mapping[str, str]] | None = None,
        prompt_token_ids: Iterable[int] | None = None,
        request_id: str | None = None,
        cache_salt: str | None = None,
        return_token_ids: bool = True,
        return_timing: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        tools: Iterable[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        **sampling: Any,
    ) -> Iterator[GenerateChunk]:
        """Streams the deltas of one request as ``GenerateChunk``s.

        Pass exactly one of ``prompt``, ``messages`` (chat, rendered with the
        model's template) or ``prompt_token_ids``; sampling keyword arguments
        are the ``SamplingParams`` fields (``max_tokens``, ``temperature``,
        ``stop``, ``n``, ``logprobs``...), ``None`` meaning the server's
        default. ``timeout`` (seconds) is the call's gRPC deadline. Closing
        the iterator early cancels the request on the server.
        ``return_timing`` stamps each chunk with ``engine_time``, when the
        server's engine produced it (to measure what the service and the
        network add). ``tools`` (OpenAI function tools) and ``tool_choice``
        ("none", "auto", "required" or ``{"name": ...}``) need ``messages``;
        the calls come back in ``GenerateChunk.tool_calls``. ``priority``,
        ``time_limit_ms`` and ``truncate_prompt_tokens`` keyword arguments set
        the request's fields of those names; ``prompt_logprobs=k`` returns
        the prompt's logprobs in one chunk's ``prompt_logprobs``.
        """
        req = _request.generate_request(
            prompt, messages=messages, prompt_token_ids=prompt_token_ids, request_id=request_id,
            cache_salt=cache_salt, return_token_ids=return_token_ids, sampling=sampling,
            return_timing=return_timing, tools=tools, tool_choice=tool_choice)
        return self._stream(req, timeout, metadata)

    def _stream(self, req: pb.GenerateRequest, timeout: float | None,
                metadata: Metadata | None) -> Iterator[GenerateChunk]:
        deadline = Deadline(timeout)
        backoffs = self.retry.backoffs()
        while True:
            call = self.stub.Generate(req, timeout=deadline.remaining(),
                                      metadata=self.config.call_metadata(metadata))
            received = False
            try:
                for msg in call:
                    received = True
                    yield GenerateChunk.from_pb(msg)
                return
            except grpc.RpcError as error:
                delay = next(backoffs, None) if not received and is_retryable(error) else None
                if delay is None or not deadline.allows(delay):
                    raise PagedgenClientError.from_rpc_error(error) from None
            finally:
                call.cancel()   # no-op once finished; aborts the request when closed early
            time.sleep(delay)

    def generate_text(self, prompt: str | None = None, **kwargs: Any) -> str | list[str]:
        """The whole text of the request: a ``str`` when ``n`` is 1 (the
        default), else a list with one text per completion, by index."""
        texts = collect_texts(list(self.generate(prompt, **kwargs)))
        return texts[0] if (kwargs.get("n") or 1) == 1 else texts

    # -- unary calls ----------------------------------------------------------

    def _unary(self, method: Callable[..., T], req: Any, timeout: float | None,
               metadata: Metadata | None) -> T:
        deadline = Deadline(timeout)
        backoffs = self.retry.backoffs()
        while True:
            try:
                return method(req, timeout=deadline.remaining(), metadata=self.config.call_metadata(metadata))
            except grpc.RpcError as error:
                delay = next(backoffs, None) if is_retryable(error) else None
                if delay is None or not deadline.allows(delay):
                    raise PagedgenClientError.from_rpc_error(error) from None
            time.sleep(delay)

    def tokenize(self, text: str | None = None, *, messages: Iterable[Mapping[str, str]] | None = None,
                 timeout: float | None = None, metadata: Metadata | None = None) -> list[int]:
        """Token ids of ``text``, or of ``messages`` through the chat template."""
        req = _request.tokenize_request(text, messages)
        return list(self._unary(self.stub.Tokenize, req, timeout, metadata).token_ids)

    def detokenize(self, token_ids: Iterable[int], *, skip_special_tokens: bool | None = None,
                   timeout: float | None = None, metadata: Metadata | None = None) -> str:
        req = _request.detokenize_request(token_ids, skip_special_tokens)
        return self._unary(self.stub.Detokenize, req, timeout, metadata).text

    def model_info(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> ModelInfo:
        return ModelInfo.from_pb(self._unary(self.stub.ModelInfo, pb.ModelInfoRequest(), timeout, metadata))

    def stats(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> Stats:
        return Stats.from_pb(self._unary(self.stub.GetStats, pb.GetStatsRequest(), timeout, metadata))

    def abort(self, request_ids: str | Iterable[str], *, timeout: float | None = None,
              metadata: Metadata | None = None) -> list[str]:
        """End in-flight requests by id (their streams finish with "abort"); the ids that were in flight."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        resp = self._unary(self.stub.Abort, pb.AbortRequest(request_ids=ids), timeout, metadata)
        return list(resp.aborted_ids)

    def server_info(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> ServerInfo:
        """The server's version, engine sizing and request limits (``ServerInfo``)."""
        return ServerInfo.from_pb(self._unary(self.stub.GetServerInfo, pb.GetServerInfoRequest(), timeout, metadata))

    # -- health ---------------------------------------------------------------

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """The server's health status for ``service`` ("" = overall):
        "SERVING", "NOT_SERVING"... Raises if the server is unreachable."""
        check = self._channel.unary_unary(
            _health.CHECK_METHOD,
            request_serializer=_health.HealthCheckRequest.SerializeToString,
            response_deserializer=_health.HealthCheckResponse.FromString)
        req = _health.HealthCheckRequest(service=service)
        try:
            return _health.status_name(check(req, timeout=timeout, metadata=self.config.call_metadata(None)))
        except grpc.RpcError as error:
            raise PagedgenClientError.from_rpc_error(error) from None

    def wait_until_serving(self, timeout: float = 60.0, service: str = "") -> None:
        """Blocks until health is SERVING; raises ``TimeoutError`` after ``timeout``."""
        deadline = Deadline(timeout)
        while True:
            try:
                if self.health(service, timeout=min(5.0, max(0.1, deadline.remaining()))) == "SERVING":
                    return
            except PagedgenClientError:
                pass
            if not deadline.allows(0.1):
                raise TimeoutError(f"{self.config.target} not SERVING after {timeout}s")
            time.sleep(0.1)
