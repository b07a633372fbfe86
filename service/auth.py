"""Optional API-key check: ``authorization: Bearer KEY`` on every call.

Health and reflection stay open, so that probes and tools work without the
key. The comparison runs in constant time.
"""

from __future__ import annotations

import hmac

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str):
        if not api_key:
            raise ValueError("api_key must not be empty")
        self._expected = f"Bearer {api_key}".encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES) or self._authorized(details):
            return handler
        return _denying(handler)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        return hmac.compare_digest(given, self._expected)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that rejects the call."""
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong API key (metadata 'authorization: Bearer KEY')")

    async def deny_stream(request, context):
        await deny(request, context)
        yield  # pragma: no cover - makes this an async generator

    kinds = dict(request_deserializer=handler.request_deserializer,
                 response_serializer=handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kinds)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kinds)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kinds)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kinds)
