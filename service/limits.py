"""What the server accepts: per-request limits, undecodable messages, exposure.

``RequestLimits`` bounds the fields a caller controls that cost the server
memory or time (``n``, ``max_tokens``, stop strings); the prompt's length is
the engine's limit (``EngineArgs.max_prompt_tokens``) and the message size
gRPC's (``ServerOptions.max_message_bytes``). A request over a limit gets
INVALID_ARGUMENT naming the field, the limit and the ``pagedgen serve`` flag.

``DecodeGuard`` answers request bytes that do not parse with INVALID_ARGUMENT
(grpc's own answer is UNKNOWN). ``exposure_warning`` says what to fix when a
bind address is reachable from other machines without an API key.
"""

from __future__ import annotations

import inspect
import ipaddress
from contextlib import aclosing
from dataclasses import dataclass, replace

import grpc

from common.errors import InvalidRequestError
from engine.sampling_params import SamplingParams

DEFAULT_MAX_MESSAGE_BYTES = 4 * 2**20       # grpc's default; room for a 128k-token prompt


@dataclass(frozen=True)
class RequestLimits:
    max_n: int = 16                         # completions per request
    max_tokens: int | None = None           # sampling.max_tokens at most; None: the model's context bounds it
    max_stop_strings: int = 16              # entries of sampling.stop
    max_stop_string_len: int = 256          # characters per stop string

    def __post_init__(self) -> None:
        for name in ("max_n", "max_stop_strings", "max_stop_string_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")

    def enforce(self, params: SamplingParams, *, max_tokens_given: bool = True) -> SamplingParams:
        """``params``, or ``InvalidRequestError`` if they ask for more than allowed.

        A request that left ``max_tokens`` unset (``None``: up to the context,
        in gRPC and HTTP alike) gets at most ``self.max_tokens``, rather than
        an error for a value it never sent.
        """
        if (not max_tokens_given and self.max_tokens is not None
                and (params.max_tokens is None or params.max_tokens > self.max_tokens)):
            if params.min_tokens > self.max_tokens:
                raise _over("sampling.min_tokens", params.min_tokens, self.max_tokens, "--max-output-tokens",
                            "lower min_tokens")
            params = replace(params, max_tokens=self.max_tokens)
        if params.n > self.max_n:
            raise _over("sampling.n", params.n, self.max_n, "--max-n", "ask for fewer completions")
        if self.max_tokens is not None and params.max_tokens is not None and params.max_tokens > self.max_tokens:
            raise _over("sampling.max_tokens", params.max_tokens, self.max_tokens, "--max-output-tokens",
                        "lower max_tokens")
        if len(params.stop) > self.max_stop_strings:
            raise _over("sampling.stop", f"{len(params.stop)} strings", self.max_stop_strings, "--max-stop-strings",
                        "send fewer stop strings")
        longest = max(params.stop, key=len, default="")
        if len(longest) > self.max_stop_string_len:
            raise _over("sampling.stop", f"a string of {len(longest)} characters", self.max_stop_string_len,
                        "--max-stop-string-len", "shorten the stop strings")
        return params


def _over(field: str, got, limit: int, flag: str, fix: str) -> InvalidRequestError:
    return InvalidRequestError(f"{field} is {got}, but this server allows at most {limit} "
                               f"(pagedgen serve {flag}); {fix}")


def is_loopback(host: str) -> bool:
    """True if ``host`` binds only this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False         # a host name: it may resolve anywhere


def exposure_warning(host: str, *, has_api_key: bool, has_tls: bool) -> str | None:
    """What to tell the operator when ``host`` is reachable from other machines
    and nothing keeps strangers out; None when it is fine."""
    if is_loopback(host) or has_api_key:
        return None
    fix = "--api-key" if has_tls else "--api-key and --tls-cert/--tls-key"
    return (f"listening on {host}, reachable from other machines, without an API key"
            f"{'' if has_tls else ' or TLS'}: anyone who reaches it can use the model; "
            f"set {fix}, or bind 127.0.0.1")


# -- undecodable request bytes --------------------------------------------------

class _Undecodable:
    def __init__(self, error: Exception):
        self.reason = str(error) or type(error).__name__


def _lenient(parse):
    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as e:  # noqa: BLE001 - DecodeError and kin: the caller's bytes are wrong
            return _Undecodable(e)
    return deserialize


async def _reject(request: _Undecodable, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request message does not parse: {request.reason}")


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Request bytes that are not a valid message get INVALID_ARGUMENT.

    Wraps unary-request handlers only: their deserializer returns a marker
    instead of raising, and the behaviour rejects the marker.
    """

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        kinds = dict(request_deserializer=_lenient(handler.request_deserializer),
                     response_serializer=handler.response_serializer)
        if handler.unary_unary and inspect.iscoroutinefunction(handler.unary_unary):
            inner = handler.unary_unary

            async def unary(request, context):
                if isinstance(request, _Undecodable):
                    return await _reject(request, context)
                return await inner(request, context)
            return grpc.unary_unary_rpc_method_handler(unary, **kinds)
        if handler.unary_stream and inspect.iscoroutinefunction(handler.unary_stream):
            inner = handler.unary_stream        # writes with context.write (health's Watch)

            async def writer(request, context):
                if isinstance(request, _Undecodable):
                    return await _reject(request, context)
                return await inner(request, context)
            return grpc.unary_stream_rpc_method_handler(writer, **kinds)
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            inner_stream = handler.unary_stream

            async def stream(request, context):
                if isinstance(request, _Undecodable):
                    await _reject(request, context)
                    return
                async with aclosing(inner_stream(request, context)) as items:
                    async for item in items:
                        yield item
            return grpc.unary_stream_rpc_method_handler(stream, **kinds)
        return handler
