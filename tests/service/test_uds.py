"""Serving over a Unix domain socket (`pagedgen serve --uds PATH`), and `unix:` targets in the client.

Real servers over the tiny model: the same greedy stream over the socket as
over TCP, the socket's mode, a live server's socket never taken over, a
stale one replaced, TLS and the API key over the socket, and the command
line end to end.
"""

from __future__ import annotations

import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest

from engine.async_engine import AsyncEngine
from pagedgen_client import Client, PagedgenClientError, RetryPolicy
from service.server import ServerOptions
from service.uds import MAX_PATH_BYTES
from tests.service.conftest import ServerThread, tiny_engine_args
from tests.service.test_serve_process import ServeProcess
from tests.service.test_tls import pki  # noqa: F401  (the certificates fixture)

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sock_dir():
    """A short directory for sockets (pytest's tmp_path can exceed the 107-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="pg-uds-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def engine(tiny_model_dir):
    """A real engine per test: stopping a server drains its engine for good."""
    engine = AsyncEngine(tiny_engine_args(tiny_model_dir, num_kv_blocks=128))
    yield engine
    engine.shutdown()


def _greedy(client: Client) -> list[int]:
    chunks = list(client.generate("The cat watches", max_tokens=24, ignore_eos=True, temperature=0, timeout=60))
    return [t for c in chunks for t in c.token_ids]


def test_same_stream_over_the_socket_as_over_tcp(engine, sock_dir):
    path = sock_dir / "pagedgen.sock"
    server = ServerThread(engine, ServerOptions(port=0, uds_path=str(path)))
    try:
        assert server.server.uds_address == f"unix:{path}"
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660        # this user and group may connect
        with server.client() as tcp, Client(f"unix:{path}") as over_socket, \
                Client(f"unix://{path}") as uri_form:
            assert over_socket.health() == "SERVING" and uri_form.health() == "SERVING"
            expected = _greedy(tcp)
            assert len(expected) == 24
            assert _greedy(over_socket) == expected and _greedy(uri_form) == expected
    finally:
        server.stop(grace=0.5)
    assert not path.exists()                                # removed when the server stops


def test_relative_path_and_another_mode(engine, sock_dir, monkeypatch):
    monkeypatch.chdir(sock_dir)
    server = ServerThread(engine, ServerOptions(port=0, uds_path="relative.sock", uds_mode=0o600))
    try:
        assert server.server.uds_address == f"unix:{sock_dir / 'relative.sock'}"
        assert stat.S_IMODE((sock_dir / "relative.sock").stat().st_mode) == 0o600
        with Client("unix:relative.sock") as client:
            assert client.health() == "SERVING"
    finally:
        server.stop(grace=0.5)


def test_a_live_servers_socket_is_never_taken_over_but_a_stale_one_is_replaced(engine, sock_dir):
    path = sock_dir / "pagedgen.sock"
    first = ServerThread(engine, ServerOptions(port=0, uds_path=str(path)))
    try:
        with pytest.raises(OSError, match="another server is listening"):
            ServerThread(engine, ServerOptions(port=0, uds_path=str(path)))
        with Client(f"unix:{path}") as client:
            assert client.health() == "SERVING"             # the first one still has it
    finally:
        first.stop(grace=0.5)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))                                   # bound, never listening: what a killed server leaves
    stale.close()
    assert path.exists()
    second = ServerThread(engine, ServerOptions(port=0, uds_path=str(path)))
    try:
        with Client(f"unix:{path}") as client:
            assert client.health() == "SERVING"
    finally:
        second.stop(grace=0.5)


def test_paths_that_cannot_be_served(engine, sock_dir):
    regular = sock_dir / "not-a-socket"
    regular.write_text("data")
    with pytest.raises(OSError, match="not a socket"):
        ServerThread(engine, ServerOptions(port=0, uds_path=str(regular)))
    assert regular.read_text() == "data"                    # left alone
    with pytest.raises(OSError, match="directory"):
        ServerThread(engine, ServerOptions(port=0, uds_path=str(sock_dir / "missing" / "pagedgen.sock")))
    with pytest.raises(ValueError, match="longer than"):
        ServerOptions(uds_path="/tmp/" + "x" * MAX_PATH_BYTES)
    with pytest.raises(ValueError, match="empty"):
        ServerOptions(uds_path=" ")


@pytest.mark.parametrize("target", ["unix:", "unix:///", "unix://host/tmp/x.sock", ""])
def test_client_rejects_unusable_unix_targets(target):
    with pytest.raises(ValueError):
        Client(target)


def test_tls_and_api_key_apply_to_the_socket_too(engine, sock_dir, pki):  # noqa: F811
    ours = pki["ours"]
    path = sock_dir / "pagedgen.sock"
    server = ServerThread(engine, ServerOptions(port=0, uds_path=str(path), api_key="k3y",
                                                tls_cert_file=ours["server"], tls_key_file=ours["server_key"]))
    try:
        # Over a socket the authority is "localhost", a name the server certificate holds.
        with Client(f"unix:{path}", root_certificates=ours["ca"], api_key="k3y") as member:
            assert len(_greedy(member)) == 24
        with Client(f"unix:{path}", root_certificates=ours["ca"], retry=RetryPolicy(max_attempts=1)) as keyless:
            assert keyless.health() == "SERVING"
            with pytest.raises(PagedgenClientError) as info:
                _greedy(keyless)
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(f"unix:{path}", retry=RetryPolicy(max_attempts=1)) as plaintext:
            with pytest.raises(PagedgenClientError) as info:
                plaintext.health(timeout=5)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0.5)


def test_serve_uds_from_the_command_line(tiny_model_dir, sock_dir):
    path = sock_dir / "serve.sock"
    server = ServeProcess("--model", tiny_model_dir, "--backend", "cpu", "--num-kv-blocks", "128",
                          "--uds", str(path), "--grace-period", "30")
    try:
        ready = server.wait_event("server_ready", timeout=60)
        assert ready["uds"] == f"unix:{path}"
        probe = subprocess.run([sys.executable, "-m", "cli", "health", "--server", f"unix:{path}"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        assert (probe.returncode, probe.stdout.strip()) == (0, "SERVING")
        with Client(f"unix:{path}") as over_socket, Client(ready["address"]) as tcp:
            assert _greedy(over_socket) == _greedy(tcp)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
        assert not path.exists()
    finally:
        server.kill()
