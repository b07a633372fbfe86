"""The one place that maps exceptions to gRPC status codes.

Servicer methods are wrapped with ``@map_errors``; nothing else in the
service chooses a status code for an engine error.

==============================================  ===================
exception                                       status
==============================================  ===================
DuplicateRequestError (request id in flight)    ALREADY_EXISTS
InvalidRequestError, ValueError                 INVALID_ARGUMENT
QueueFullError                                  RESOURCE_EXHAUSTED
EngineShutdownError, ModelLoadingError         UNAVAILABLE
RequestFailedError, EngineDeadError             INTERNAL (with the request id)
TimeoutError (the call's deadline passed)       DEADLINE_EXCEEDED
anything else                                   INTERNAL (logged with its traceback)
==============================================  ===================
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextlib import aclosing

import grpc
import structlog

from common.errors import (DuplicateRequestError, EngineDeadError, EngineShutdownError, QueueFullError,
                           RequestFailedError)

log = structlog.get_logger(__name__)


class ModelLoadingError(EngineShutdownError):
    """The server is up but its model is not loaded yet (UNAVAILABLE)."""


class LoadingEngine:
    """A front end's ``engine`` attribute, None until the model is loaded:
    reading it before then raises ModelLoadingError. The value lives in
    ``_<name>`` (``_engine``), for code that checks without raising."""

    def __set_name__(self, owner, name: str) -> None:
        self.attr = f"_{name}"

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        engine = getattr(obj, self.attr, None)
        if engine is None:
            raise ModelLoadingError("the model is still loading; retry shortly")
        return engine

    def __set__(self, obj, engine) -> None:
        setattr(obj, self.attr, engine)


def status_of(exc: BaseException, request_id: str | None = None) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for ``exc``."""
    if isinstance(exc, DuplicateRequestError):      # before ValueError: it is an InvalidRequestError too
        return grpc.StatusCode.ALREADY_EXISTS, str(exc)
    if isinstance(exc, ValueError):                 # InvalidRequestError is one too
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, EngineShutdownError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    where = f"request {request_id}: " if request_id else ""
    if isinstance(exc, RequestFailedError):
        return grpc.StatusCode.INTERNAL, str(exc)   # already names its request
    if isinstance(exc, EngineDeadError):
        return grpc.StatusCode.INTERNAL, f"{where}{exc}"
    return grpc.StatusCode.INTERNAL, f"{where}internal error ({type(exc).__name__})"


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, request, method: str):
    request_id = getattr(request, "request_id", None) or None
    code, message = status_of(exc, request_id)
    if code == grpc.StatusCode.INTERNAL:
        log.error("rpc_failed", method=method, request_id=request_id, code=code.name, error=repr(exc),
                  exc_info=not isinstance(exc, (RequestFailedError, EngineDeadError)))
    else:
        log.debug("rpc_rejected", method=method, request_id=request_id, code=code.name, error=message)
    await context.abort(code, message)


def map_errors(method: Callable) -> Callable:
    """Wrap a servicer method (coroutine or async generator) so that the
    exceptions it raises end the call with their status (``status_of``)."""
    name = method.__name__
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async with aclosing(method(self, request, context)) as items:
                    async for item in items:
                        yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                await _abort(context, exc, request, name)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            await _abort(context, exc, request, name)
    return unary
