"""Exceptions to HTTP statuses and OpenAI's error body, in one place.

Engine errors are classified by ``service.errors.status_of`` (the gRPC
mapping), so both APIs agree on what each error means; this module only
turns that gRPC code into the HTTP status OpenAI clients expect:

=====================================  ======  ==============================
exception                              status  error.type
=====================================  ======  ==============================
InvalidRequestError, ValueError,       400     invalid_request_error
a body that does not validate
(no or wrong API key)                  401     invalid_request_error
ModelNotFoundError, unknown route      404     invalid_request_error
DuplicateRequestError (id in flight)   409     invalid_request_error
(body over --max-message-bytes)        413     invalid_request_error
QueueFullError                         429     rate_limit_error
EngineShutdownError, model loading     503     service_unavailable_error
TimeoutError                           504     timeout_error
RequestFailedError, EngineDeadError,   500     server_error
anything else
=====================================  ======  ==============================
"""

from __future__ import annotations

import grpc
import structlog
from fastapi.exceptions import RequestValidationError

from common.errors import EngineDeadError, PagedgenError, RequestFailedError
from service.errors import status_of
from service.openai.responses import ErrorBody, ErrorResponse

log = structlog.get_logger(__name__)

# gRPC code -> (HTTP status, error.type, error.code)
_FROM_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", "request_id_in_use"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "queue_full"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error", "timeout"),
    grpc.StatusCode.INTERNAL: (500, "server_error", "internal_error"),
}


# What each HTTP status or stream error counts as in the outcome metrics (service.metrics: by gRPC code).
_GRPC_OF_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 409: "ALREADY_EXISTS",
                   413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 503: "UNAVAILABLE",
                   504: "DEADLINE_EXCEEDED"}
_GRPC_OF_BODY = {(kind, code): grpc_code.name for grpc_code, (_, kind, code) in _FROM_GRPC.items()}


def grpc_code_of_status(status: int) -> str:
    """The gRPC status code (name) that an HTTP answer of ``status`` corresponds to."""
    return "OK" if status == 200 else _GRPC_OF_STATUS.get(status, "INTERNAL")


def grpc_code_of_error(error: dict) -> str:
    """The gRPC status code (name) of an error event's ``error`` object (a stream that failed after its 200)."""
    return _GRPC_OF_BODY.get((error.get("type"), error.get("code")), "INTERNAL")


class HTTPError(PagedgenError):
    """An error whose status the HTTP layer decides (auth, unknown model or route)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


class ModelNotFoundError(HTTPError):
    def __init__(self, model: str, served: str):
        super().__init__(404, f"The model `{model}` does not exist; this server serves `{served}`",
                         param="model", code="model_not_found")


class AuthenticationError(HTTPError):
    def __init__(self):
        super().__init__(401, "Missing or incorrect API key: send the header 'Authorization: Bearer KEY'",
                         code="invalid_api_key")


class ClientDisconnectedError(Exception):
    """The client closed the connection before its answer was ready."""


def error_of(exc: BaseException, request_id: str | None = None) -> tuple[int, ErrorResponse]:
    """The HTTP status and OpenAI error body a client gets for ``exc``."""
    if isinstance(exc, HTTPError):
        return exc.status, _body(exc.message, exc.type, exc.param, exc.code)
    code, message = status_of(exc, request_id)
    status, kind, error_code = _FROM_GRPC.get(code, _FROM_GRPC[grpc.StatusCode.INTERNAL])
    if status == 500:
        log.error("http_request_failed", request_id=request_id, error=repr(exc),
                  exc_info=not isinstance(exc, (RequestFailedError, EngineDeadError)))
    return status, _body(message, kind, getattr(exc, "param", None), error_code)


def _body(message: str, kind: str, param: str | None, code: str | None) -> ErrorResponse:
    return ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))


def invalid_body_error(exc: RequestValidationError) -> HTTPError:
    """A 400 naming the first offending field and what to do about it."""
    errors = exc.errors()
    if not errors:
        return HTTPError(400, "invalid request body")
    err = errors[0]
    loc = [p for p in err.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    kind = err.get("type")
    if kind == "json_invalid":
        param, message = None, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
    elif kind == "missing":
        message = f"{param} is required" if param else "the request needs a JSON object body"
    elif param in _SHAPES:
        message = f"{param} must be {_SHAPES[param]}"
    elif kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    else:
        message = f"{param}: {err.get('msg')}" if param else f"the request body must be a JSON object: {err.get('msg')}"
    return HTTPError(400, message, param=param)


# What a field of several accepted shapes must look like (pydantic reports each shape's failure).
_SHAPES = {"prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
           "stop": "a string or a list of strings"}


def _is_type_tag(part) -> bool:
    """pydantic names the union member that failed in ``loc`` ('str', 'list[int]', ...): not a field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict"))
