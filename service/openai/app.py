"""The OpenAI-compatible HTTP API: the FastAPI app and its uvicorn server.

``OpenAIServer`` runs uvicorn on the caller's event loop (the gRPC server's),
over the same engine; ``PagedgenServer`` starts it, attaches the engine once
loaded, and stops it after the drain. A client that disconnects cancels its
handler (non-streamed answers) or its event stream (streamed ones); either
way the engine requests are aborted and their KV blocks freed. A client's
``X-Request-Id`` header is the call's engine request id (echoed in the
response's header and ``id``; one is made when absent), so ``POST /v1/abort``
(``{"request_ids": [...]}``, as gRPC's Abort) can end it from another
connection.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable

import structlog
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import PagedgenError
from service.info import pagedgen_version
from service.openai import tokenize as tok
from service.openai.errors import (AuthenticationError, ClientDisconnectedError, HTTPError, error_of,
                                   invalid_body_error)
from service.openai.observe import HttpCall
from service.openai.protocol import AbortRequest, ChatCompletionRequest, CompletionRequest, InvalidFieldError
from service.openai.serving import EventStream, OpenAIServing

log = structlog.get_logger(__name__)

# Status logged (never sent) when the client left before its answer.
CLIENT_CLOSED_REQUEST = 499


def build_app(serving: OpenAIServing, api_key: str | None = None, *, metrics=None,
              log_requests: bool = False) -> FastAPI:
    """The app: /health and /version open; /v1/*, /tokenize and /detokenize behind
    ``Authorization: Bearer <api_key>`` when one is set. Generation calls count
    in ``metrics`` (a ``service.metrics.ServerMetrics``) and, with
    ``log_requests``, log their text, as gRPC's Generate does."""
    app = FastAPI(title="pagedgen OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def authorize(request: Request) -> None:     # async: no thread-pool hop per request
        if expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise AuthenticationError()

    @app.exception_handler(PagedgenError)         # HTTPError (auth, model), the model still loading
    async def pagedgen_error(request: Request, exc: PagedgenError) -> Response:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> Response:
        return _error_response(invalid_body_error(exc))

    @app.exception_handler(StarletteHTTPException)  # unknown route, wrong method
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error_response(HTTPError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                         code=str(exc.status_code)))

    @app.get("/health")
    async def health() -> Response:
        """200 while serving; 503 while the model loads, after the engine died, or while draining."""
        return Response(status_code=200 if serving.is_serving else 503)

    @app.get("/version")
    async def version() -> Response:
        return _json(tok.VersionResponse(version=pagedgen_version()))

    @app.post("/tokenize", dependencies=[Depends(authorize)])
    async def tokenize(body: tok.TokenizeCompletionRequest | tok.TokenizeChatRequest) -> Response:
        serving.check_model(body.model)
        return _json(await tok.tokenize(serving.engine, body))

    @app.post("/detokenize", dependencies=[Depends(authorize)])
    async def detokenize(body: tok.DetokenizeRequest) -> Response:
        serving.check_model(body.model)
        return _json(await tok.detokenize(serving.engine, body))

    def call(endpoint: str, body) -> HttpCall:
        record = HttpCall(endpoint, metrics, log_requests)
        record.received(body)
        return record

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> Response:
        return _json(serving.models())

    @app.get("/v1/models/{model:path}", dependencies=[Depends(authorize)])
    async def model(model: str) -> Response:
        serving.check_model(model)
        return _json(serving.models().data[0])

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        rid = request_id_of(request, "cmpl")
        return _with_request_id(await _answer(request, call("completions", body), serving.completion(body, rid)), rid)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        rid = request_id_of(request, "chatcmpl")
        return _with_request_id(await _answer(request, call("chat", body), serving.chat(body, rid)), rid)

    @app.post("/v1/abort", dependencies=[Depends(authorize)])
    async def abort(body: AbortRequest) -> Response:
        """End in-flight requests by id, like gRPC's Abort: any caller holding the key may abort any id."""
        aborted = serving.engine.abort_in_flight(body.request_ids)
        if aborted:
            log.info("requests_aborted", request_ids=aborted, api="http")
        return Response(json.dumps({"aborted_ids": aborted}), media_type="application/json")

    return app


# Longest X-Request-Id taken (as gRPC's request_id).
MAX_REQUEST_ID_LEN = 256


def request_id_of(request: Request, prefix: str) -> str:
    """The call's engine request id: the client's X-Request-Id, else ``<prefix>-<random hex>``."""
    given = request.headers.get("x-request-id")
    if given is None or not given.strip():
        return f"{prefix}-{uuid.uuid4().hex}"
    if len(given) > MAX_REQUEST_ID_LEN:
        raise InvalidFieldError("X-Request-Id", f"X-Request-Id must be at most {MAX_REQUEST_ID_LEN} characters")
    return given


def _with_request_id(response: Response, request_id: str) -> Response:
    """Echo the call's id to the client, whatever the answer (vLLM's header)."""
    response.headers["X-Request-Id"] = request_id
    return response


async def _answer(request: Request, call: HttpCall, work: Awaitable) -> Response:
    """Run ``work`` until it answers or the client leaves; map its errors. One log event per request."""
    status = 200
    try:
        result = await until_disconnected(request, work)
        if isinstance(result, EventStream):
            status = None                       # logged when the stream ends
            call.request_id = result.run.request_id
            return _SSEResponse(result, call)
        call.answered(result)
        return _json(result)
    except ClientDisconnectedError:
        status = CLIENT_CLOSED_REQUEST
        return Response(status_code=status)
    except Exception as e:  # noqa: BLE001 - every error becomes an OpenAI error body
        response = _error_response(e)
        status = response.status_code
        return response
    finally:
        if status is not None:
            if status != 200:
                call.failed(status)
            call.finish(status, streamed=False)


class _SSEResponse(StreamingResponse):
    """Closes its event stream when the response ends, however it ends (a client
    that left cancels the send): the engine requests are aborted at once, not
    whenever the generators are garbage-collected."""

    def __init__(self, stream: EventStream, call: HttpCall):
        super().__init__(_logged_stream(stream, call), media_type="text/event-stream",
                         headers={"cache-control": "no-cache"})
        self._stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self._stream.aclose()


async def _logged_stream(stream: EventStream, call: HttpCall) -> AsyncIterator[str]:
    status = CLIENT_CLOSED_REQUEST              # unless the stream runs to its end
    try:
        async for event in stream:
            call.event(event)
            yield event
        status = 200
    finally:
        if status != 200:
            call.failed(status)
        call.finish(status, streamed=True)


async def until_disconnected(request: Request, work: Awaitable):
    """``await work``, cancelled (and ``ClientDisconnectedError`` raised) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnectedError()


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone (the body is read: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _json(model) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _error_response(exc: Exception) -> Response:
    status, body = error_of(exc)
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")


class BodyLimit:
    """ASGI middleware: a request whose declared body exceeds ``max_bytes`` gets 413
    before it is read; an undeclared (chunked) one is cut off at the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            status, body = error_of(HTTPError(413, f"the request body has {int(declared)} bytes; this server "
                                                   f"takes at most {self.max_bytes} (pagedgen serve "
                                                   "--max-message-bytes)", code="request_too_large"))
            response = Response(body.model_dump_json(), status_code=status, media_type="application/json")
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPError(413, f"the request body exceeds {self.max_bytes} bytes", code="request_too_large")
            return message

        await self.app(scope, limited_receive, send)


class OpenAIServer:
    """uvicorn serving ``build_app`` on the running event loop; no signal handlers of its own."""

    def __init__(self, engine=None, *, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 served_model_name: str | None = None, limits=None, max_body_bytes: int = 4 * 2**20,
                 tls_cert_file: str | None = None, tls_key_file: str | None = None,
                 tls_client_ca_file: str | None = None, metrics=None, log_requests: bool = False,
                 tool_call_parser: str | None = None):
        self.serving = OpenAIServing(engine, served_model_name, limits, tool_call_parser)
        self.host, self.port = host, port
        tls = {}
        if tls_cert_file is not None:
            tls = dict(ssl_certfile=tls_cert_file, ssl_keyfile=tls_key_file, ssl_ca_certs=tls_client_ca_file,
                       ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca_file else ssl.CERT_NONE)
        app = BodyLimit(build_app(self.serving, api_key, metrics=metrics, log_requests=log_requests), max_body_bytes)
        self._config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", ws="none", **tls)
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._ticker: asyncio.Task | None = None

    @classmethod
    def from_options(cls, engine, options, metrics=None) -> "OpenAIServer":
        """The HTTP API that ``service.server.ServerOptions`` asks for (its host, key, TLS, limits and
        ``--log-requests``), counting its requests in ``metrics`` (the gRPC server's)."""
        return cls(engine, host=options.host, port=options.openai_port, api_key=options.api_key,
                   served_model_name=options.served_model_name, limits=options.limits,
                   max_body_bytes=options.max_message_bytes, tls_cert_file=options.tls_cert_file,
                   tls_key_file=options.tls_key_file, tls_client_ca_file=options.tls_client_ca_file,
                   metrics=metrics, log_requests=options.log_requests,
                   tool_call_parser=options.tool_call_parser)

    def attach(self, engine) -> None:
        self.serving.engine = engine

    def begin_drain(self) -> None:
        """/health answers 503 from now on (the engine refuses new requests itself)."""
        self.serving.is_draining = True

    async def start(self) -> int:
        """Bind and serve; returns the bound port."""
        self._socket = _bind(self.host, self.port)
        self.port = self._socket.getsockname()[1]
        self._config.load()
        server = self._server = uvicorn.Server(self._config)
        server.lifespan = self._config.lifespan_class(self._config)
        await server.startup(sockets=[self._socket])
        self._ticker = asyncio.create_task(server.main_loop(), name="pagedgen-http")
        return self.port

    async def stop(self, grace: float) -> None:
        """Close the listener, give open responses ``grace`` seconds, then cut them."""
        server = self._server
        if server is None:
            return
        self._server = None
        server.should_exit = True
        if self._ticker is not None:
            await self._ticker
        server.config.timeout_graceful_shutdown = max(grace, 0.0)
        await server.shutdown(sockets=[self._socket])


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6); OSError if taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise OSError(f"cannot bind the OpenAI HTTP API to {host}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot bind the OpenAI HTTP API to {host}:{port}: {e}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock
