"""Fixtures: real servers on free loopback ports, and clients to them.

``ServerThread`` runs a ``PagedgenServer`` on its own event loop thread so
that tests can use the blocking ``Client``. Engines come from a tiny random
Llama directory (``tests/factories.make_tiny_hf_model``) for speed; the
embedded default model only in slow-marked tests.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import structlog

from pagedgen_client import Client
from service.server import PagedgenServer, ServerOptions


@pytest.fixture(autouse=True)
def _logs_to_current_stderr():
    """Server logs go to whatever sys.stderr is now (never the CLI's stdout,
    never a stream that a finished test closed)."""
    saved = structlog.get_config()
    structlog.configure(logger_factory=lambda *args: structlog.PrintLogger(sys.stderr))
    yield
    structlog.configure(**saved)


class ServerThread:
    """A started PagedgenServer over ``engine`` on a background event loop."""

    def __init__(self, engine, options: ServerOptions | None = None):
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self._thread.start()
        self.server: PagedgenServer = self.call(self._start(options or ServerOptions(port=0)))

    async def _start(self, options: ServerOptions) -> PagedgenServer:
        server = PagedgenServer(self.engine, options)
        await server.start()
        return server

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def http_url(self) -> str:
        """The OpenAI HTTP API's base address (``ServerOptions(openai_port=0)``)."""
        return f"http://127.0.0.1:{self.server.openai_port}"

    def client(self, **kwargs) -> Client:
        return Client(self.address, **kwargs)

    def stop(self, grace: float = 1.0) -> bool:
        try:
            return self.call(self.server.stop(grace), timeout=grace + 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


@pytest.fixture
def fake_engine():
    from tests.service.fakes import FakeEngine

    return FakeEngine(step_s=0.01)


@pytest.fixture
def fake_server(fake_engine):
    server = ServerThread(fake_engine)
    yield server
    server.stop(grace=0.5)


@pytest.fixture
def fake_client(fake_server):
    with fake_server.client() as client:
        yield client


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    factories = pytest.importorskip("tests.factories", reason="tests/factories.py not there yet")
    return str(factories.make_tiny_hf_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama"))


def tiny_engine_args(model: str | None, **overrides):
    from engine.args import EngineArgs

    defaults = dict(model=model, backend="cpu", num_kv_blocks=256, block_size=16, max_num_seqs=64, seed=0)
    return EngineArgs(**{**defaults, **overrides})


@contextmanager
def serving(model_dir: str | None, options: ServerOptions | None = None, *, grace: float = 2.0,
            **engine_overrides) -> Iterator[ServerThread]:
    """A real AsyncEngine over ``model_dir`` (``tiny_engine_args`` with ``engine_overrides``) behind a
    started server; on exit the server stops (``grace`` seconds) and the engine shuts down."""
    from engine.async_engine import AsyncEngine

    engine = AsyncEngine(tiny_engine_args(model_dir, **engine_overrides))
    server = ServerThread(engine, options)
    try:
        yield server
    finally:
        try:
            server.stop(grace=grace)
        finally:
            engine.shutdown()


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    """A real AsyncEngine on the tiny model behind a real server (per module)."""
    with serving(tiny_model_dir) as server:
        server.model_dir = tiny_model_dir
        yield server


@pytest.fixture(scope="module")
def tiny_client(tiny_server):
    with tiny_server.client() as client:
        yield client
