"""Server bootstrap: the Generate servicer, health, reflection, TLS, drain.

``PagedgenServer`` serves an already loaded ``AsyncEngine`` (whoever built
the engine shuts it down); ``serve()`` is what ``pagedgen serve`` runs: load,
serve, and on SIGTERM/SIGINT drain within the grace period and return 0.
With ``ServerOptions.openai_port`` the same server also runs the
OpenAI-compatible HTTP API (``service.openai``) on its loop and engine, and
with ``ServerOptions.uds_path`` it listens on a Unix domain socket too.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pagedgen_client._proto.pagedgen.v1 import generate_pb2 as pb
from pagedgen_client._proto.pagedgen.v1 import generate_pb2_grpc as pb_grpc
from service import uds
from service.auth import ApiKeyInterceptor
from service.limits import DEFAULT_MAX_MESSAGE_BYTES, DecodeGuard, RequestLimits, exposure_warning
from service.metrics import ServerMetrics
from service.servicer import GenerateServicer
from service.tools.parsers import TOOL_CALL_PARSERS

log = structlog.get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generate"].full_name          # "pagedgen.v1.Generate"
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
HEALTH_CHECKED = ("", SERVICE_NAME)     # what health reports on: overall and the Generate service


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051                       # 0: pick a free port (see PagedgenServer.port)
    tls_cert_file: str | None = None        # server certificate chain (PEM); enables TLS
    tls_key_file: str | None = None         # its private key (PEM)
    tls_client_ca_file: str | None = None   # require client certificates signed by this CA
    api_key: str | None = None              # require "authorization: Bearer KEY" (health stays open)
    health_poll_s: float = 0.2              # how often the engine's liveness is checked
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # larger requests get RESOURCE_EXHAUSTED
    limits: RequestLimits = RequestLimits()  # n, max_tokens, stop strings per request
    log_requests: bool = False              # log prompt and completion text (debugging only)
    metrics_port: int | None = None         # serve Prometheus /metrics on host:metrics_port (0: a free port)
    openai_port: int | None = None          # also serve the OpenAI-compatible HTTP API here (0: a free port)
    served_model_name: str | None = None    # the model's name in the HTTP API and ModelInfo (default: the engine's)
    uds_path: str | None = None             # also listen on unix:PATH (same TLS and API key as the port)
    uds_mode: int = 0o660                   # the socket file's permissions: owner and group may connect
    tool_call_parser: str | None = None     # how tool calls are found in output (service.tools.parsers), for "auto"

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, "
                             f"got {self.tool_call_parser!r}")
        if self.uds_path is not None:
            uds.check_path(self.uds_path)
        if not 0 <= self.uds_mode <= 0o777:
            raise ValueError(f"uds_mode must be permission bits in [0, 0o777], got {self.uds_mode:#o}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if self.openai_port is not None and not 0 <= self.openai_port <= 65535:
            raise ValueError(f"openai_port must be in [0, 65535], got {self.openai_port}")
        if not isinstance(self.max_message_bytes, int) or self.max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be a positive integer, got {self.max_message_bytes!r}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")

    def credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert_file is None:
            return None
        client_ca = Path(self.tls_client_ca_file).read_bytes() if self.tls_client_ca_file else None
        return grpc.ssl_server_credentials(
            [(Path(self.tls_key_file).read_bytes(), Path(self.tls_cert_file).read_bytes())],
            root_certificates=client_ca, require_client_auth=client_ca is not None)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class PagedgenServer:
    """A ``grpc.aio`` server over one engine; create and use it on its event loop.

    Given no engine, it starts NOT_SERVING (Generate calls get UNAVAILABLE)
    until ``attach`` hands it the loaded one: the port is bound, and probes
    answer, while the model loads.
    """

    def __init__(self, engine=None, options: ServerOptions | None = None):
        self.engine = engine
        self.options = options or ServerOptions()
        self.port: int | None = None
        self.health = health.aio.HealthServicer()
        self._servicer = GenerateServicer(engine, limits=self.options.limits, log_requests=self.options.log_requests,
                                          served_model_name=self.options.served_model_name,
                                          max_message_bytes=self.options.max_message_bytes,
                                          tool_call_parser=self.options.tool_call_parser)
        self.metrics = ServerMetrics() if self.options.metrics_port is not None else None
        self._servicer.metrics = self.metrics
        self.metrics_port: int | None = None    # the bound port of /metrics
        self._server: grpc.aio.Server | None = None
        self._watcher: asyncio.Task | None = None
        self._is_serving = False
        self._http = None                   # service.openai.app.OpenAIServer, with options.openai_port
        self.openai_port: int | None = None
        self.uds_address: str | None = None     # "unix:/absolute/path" once bound, with options.uds_path

    @property
    def address(self) -> str:
        return format_address(self.options.host, self.port if self.port is not None else self.options.port)

    async def start(self) -> int:
        """Bind and start; SERVING if it has an engine. Returns the bound port."""
        opts = self.options
        interceptors = ([ApiKeyInterceptor(opts.api_key)] if opts.api_key else []) + [DecodeGuard()]
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", opts.max_message_bytes)])
        pb_grpc.add_GenerateServicer_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = format_address(opts.host, opts.port)
        credentials = opts.credentials()
        try:
            port = (server.add_insecure_port(address) if credentials is None
                    else server.add_secure_port(address, credentials))
        except RuntimeError as e:
            raise OSError(f"cannot bind {address}: {e}") from None
        if port == 0:
            raise OSError(f"cannot bind {address}")
        if opts.uds_path is not None:
            self.uds_address = uds.add_unix_port(server, opts.uds_path, opts.uds_mode, credentials)
        self.port, self._server = port, server
        await server.start()
        if self.metrics is not None:
            try:
                self.metrics_port = self.metrics.start_http(opts.host, opts.metrics_port)
            except BaseException:
                await server.stop(0)
                raise
        if opts.openai_port is not None:
            await self._start_http()
        hint = exposure_warning(opts.host, has_api_key=bool(opts.api_key), has_tls=credentials is not None)
        if hint:
            log.warning("server_exposed_without_auth", address=self.address, hint=hint)
        if self.engine is None:
            await self.set_serving(False)
        else:
            await self.attach(self.engine)
        return port

    async def _start_http(self) -> None:
        from service.openai.app import OpenAIServer      # FastAPI loads only when asked for

        http = OpenAIServer.from_options(self.engine, self.options, metrics=self.metrics)
        try:
            self.openai_port = await http.start()
        except BaseException:
            await self.stop_now()               # what started before it (gRPC, metrics)
            raise
        self._http = http

    async def attach(self, engine) -> None:
        """Serve ``engine`` from now on and report SERVING (unless it is dead)."""
        self.engine = self._servicer.engine = engine
        if self.metrics is not None:
            self.metrics.attach(engine)
        if self._http is not None:
            self._http.attach(engine)
        await self.set_serving(not engine.is_dead)
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch_engine(), name="pagedgen-health")

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self._is_serving = serving
        for service in HEALTH_CHECKED:
            await self.health.set(service, status)

    async def _watch_engine(self) -> None:
        """Health goes NOT_SERVING as soon as the engine loop dies."""
        while True:
            await asyncio.sleep(self.options.health_poll_s)
            if self._is_serving and self.engine.is_dead:
                log.error("health_not_serving", reason="engine_dead",
                          error=repr(getattr(self.engine, "dead_error", None)))
                await self.set_serving(False)

    async def stop(self, grace: float) -> bool:
        """Drain: NOT_SERVING, refuse new requests, let running streams finish
        within ``grace`` seconds, then stop the server. True if none was cut."""
        end = time.monotonic() + grace
        await self.set_serving(False)
        if self._http is not None:
            self._http.begin_drain()
        is_idle = True
        if self.engine is not None:
            self.engine.begin_drain()
            is_idle = await self.engine.wait_idle(grace)
        if self._http is not None:
            await self._http.stop(max(0.5, end - time.monotonic()))
        if self._watcher is not None:
            self._watcher.cancel()
        if self._server is not None:
            # Lets the last messages of finished streams flush; cancels the rest.
            await self._server.stop(max(0.5, end - time.monotonic()))
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)
        return is_idle

    async def stop_now(self) -> None:
        """Stop at once, cutting running streams (their requests are aborted)."""
        if self._watcher is not None:
            self._watcher.cancel()
        if self._http is not None:
            await self._http.stop(0)
        if self._server is not None:
            await self._server.stop(0)
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(engine_args, options: ServerOptions, grace_period: float = 30.0, *, engine_process: bool = True,
                log_config: tuple[str, str | None] = ("console", None)) -> int:
    """Load the engine, serve until SIGTERM/SIGINT, drain, exit code 0.

    A second signal during the drain cuts the remaining streams (exit 1).
    With ``engine_process`` the step loop runs in a child process, whose logs
    use ``log_config`` (format, level) too.
    """
    from service.logging import configure_logging
    from engine.async_engine import AsyncEngine    # loads torch: only when serving

    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: (force if stop.is_set() else stop).set())
    t0 = time.perf_counter()
    server = PagedgenServer(None, options)
    await server.start()                            # a busy port fails before the slow load
    log.info("server_loading", address=server.address, model=engine_args.model or "default",
             backend=engine_args.backend)
    try:
        engine = await asyncio.to_thread(AsyncEngine, engine_args, engine_process=engine_process,
                                         process_initializer=configure_logging, initializer_args=log_config)
    except BaseException:
        await server.stop_now()
        raise
    try:
        await server.attach(engine)
        info = engine.model_info
        log.info("server_ready", address=server.address, model=info.model, architecture=info.architecture,
                 max_model_len=info.max_model_len, backend=info.backend,
                 num_kv_blocks=info.num_kv_blocks, tls=options.tls_cert_file is not None,
                 openai_port=server.openai_port, metrics_port=server.metrics_port, uds=server.uds_address,
                 startup_s=round(time.perf_counter() - t0, 2))
        await stop.wait()
        log.info("server_draining", grace_s=grace_period)
        drain = asyncio.create_task(server.stop(grace_period))
        forced = asyncio.create_task(force.wait())
        await asyncio.wait((drain, forced), return_when=asyncio.FIRST_COMPLETED)
        if forced.done():
            log.warning("server_stop_forced")
            drain.cancel()
            await server.stop_now()
            return 1
        forced.cancel()
        log.info("server_stopped", drained=drain.result())
        return 0
    finally:
        await asyncio.to_thread(engine.shutdown)
