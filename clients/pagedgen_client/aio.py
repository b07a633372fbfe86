"""The asyncio client (same methods as ``Client``, awaitable)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc

from . import _health, _request
from ._channel import DEFAULT_TARGET, ChannelConfig, Deadline, Metadata, Pem, RetryPolicy, is_retryable
from ._proto.pagedgen.v1 import generate_pb2 as pb
from ._proto.pagedgen.v1 import generate_pb2_grpc as pb_grpc
from .errors import PagedgenClientError
from .types import GenerateChunk, ModelInfo, ServerInfo, Stats, collect_texts


class AsyncClient:
    """A ``grpc.aio`` client of one pagedgen server.

    Create it inside the event loop that uses it; ``async with`` or
    ``await close()``. Options as for ``Client``.
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
        self._channel = self.config.open_channel(grpc.aio)
        self.stub = pb_grpc.GenerateStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

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
    ) -> AsyncIterator[GenerateChunk]:
        """Streams the deltas of one request (see ``Client.generate``).

        Leaving the loop early does not cancel the request until the
        iterator is closed: wrap it in ``contextlib.aclosing`` (or call
        ``aclose()``) to cancel at once.
        """
        req = _request.generate_request(
            prompt, messages=messages, prompt_token_ids=prompt_token_ids, request_id=request_id,
            cache_salt=cache_salt, return_token_ids=return_token_ids, sampling=sampling,
            return_timing=return_timing, tools=tools, tool_choice=tool_choice)
        return self._stream(req, timeout, metadata)

    async def _stream(self, req: pb.GenerateRequest, timeout: float | None,
                      metadata: Metadata | None) -> AsyncIterator[GenerateChunk]:
        deadline = Deadline(timeout)
        backoffs = self.retry.backoffs()
        while True:
            call = self.stub.Generate(req, timeout=deadline.remaining(),
                                      metadata=self.config.call_metadata(metadata))
            received = False
            try:
                async for msg in call:
                    received = True
                    yield GenerateChunk.from_pb(msg)
                return
            except grpc.RpcError as error:
                delay = next(backoffs, None) if not received and is_retryable(error) else None
                if delay is None or not deadline.allows(delay):
                    raise PagedgenClientError.from_rpc_error(error) from None
            finally:
                call.cancel()   # no-op once finished; aborts the request when closed early
            await asyncio.sleep(delay)

    async def generate_text(self, prompt: str | None = None, **kwargs: Any) -> str | list[str]:
        """The whole text: a ``str`` when ``n`` is 1, else one per completion."""
        texts = collect_texts([chunk async for chunk in self.generate(prompt, **kwargs)])
        return texts[0] if (kwargs.get("n") or 1) == 1 else texts

    # -- unary calls ----------------------------------------------------------

    async def _unary(self, method: Callable[..., Any], req: Any, timeout: float | None,
                     metadata: Metadata | None) -> Any:
        deadline = Deadline(timeout)
        backoffs = self.retry.backoffs()
        while True:
            try:
                return await method(req, timeout=deadline.remaining(),
                                    metadata=self.config.call_metadata(metadata))
            except grpc.RpcError as error:
                delay = next(backoffs, None) if is_retryable(error) else None
                if delay is None or not deadline.allows(delay):
                    raise PagedgenClientError.from_rpc_error(error) from None
            await asyncio.sleep(delay)

    async def tokenize(self, text: str | None = None, *, messages: Iterable[Mapping[str, str]] | None = None,
                       timeout: float | None = None, metadata: Metadata | None = None) -> list[int]:
        req = _request.tokenize_request(text, messages)
        return list((await self._unary(self.stub.Tokenize, req, timeout, metadata)).token_ids)

    async def detokenize(self, token_ids: Iterable[int], *, skip_special_tokens: bool | None = None,
                         timeout: float | None = None, metadata: Metadata | None = None) -> str:
        req = _request.detokenize_request(token_ids, skip_special_tokens)
        return (await self._unary(self.stub.Detokenize, req, timeout, metadata)).text

    async def model_info(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> ModelInfo:
        return ModelInfo.from_pb(await self._unary(self.stub.ModelInfo, pb.ModelInfoRequest(), timeout, metadata))

    async def stats(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> Stats:
        return Stats.from_pb(await self._unary(self.stub.GetStats, pb.GetStatsRequest(), timeout, metadata))

    async def abort(self, request_ids: str | Iterable[str], *, timeout: float | None = None,
                    metadata: Metadata | None = None) -> list[str]:
        """End in-flight requests by id (their streams finish with "abort"); the ids that were in flight."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        resp = await self._unary(self.stub.Abort, pb.AbortRequest(request_ids=ids), timeout, metadata)
        return list(resp.aborted_ids)

    async def server_info(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> ServerInfo:
        """The server's version, engine sizing and request limits."""
        return ServerInfo.from_pb(await self._unary(self.stub.GetServerInfo, pb.GetServerInfoRequest(), timeout,
                                                    metadata))

    async def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        check = self._channel.unary_unary(
            _health.CHECK_METHOD,
            request_serializer=_health.HealthCheckRequest.SerializeToString,
            response_deserializer=_health.HealthCheckResponse.FromString)
        req = _health.HealthCheckRequest(service=service)
        try:
            return _health.status_name(await check(req, timeout=timeout, metadata=self.config.call_metadata(None)))
        except grpc.RpcError as error:
            raise PagedgenClientError.from_rpc_error(error) from None
