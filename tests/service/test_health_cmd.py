"""`pagedgen health`: exit 0 only when the server's grpc.health.v1 says SERVING.

Against real servers on loopback over the tiny model: serving, still loading,
draining after SIGTERM (a `pagedgen serve` process), unreachable, and behind
TLS and an API key.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cli.main import main
from engine.async_engine import AsyncEngine
from pagedgen_client import Client, RetryPolicy
from service.server import SERVICE_NAME, ServerOptions
from tests.service.conftest import ServerThread, serving, tiny_engine_args
from tests.service.test_serve_process import ServeProcess
from tests.service.test_tls import pki  # noqa: F401  (the certificates fixture)

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


def _health(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``pagedgen health ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["health", *args])
    out, err = capsys.readouterr()
    return code, out.strip(), err


def _health_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", "health", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serving_server_exits_0_for_the_server_and_the_generate_service(tiny_server, capsys):
    assert _health(capsys, "--server", tiny_server.address) == (0, "SERVING", "")
    assert _health(capsys, "--server", tiny_server.address, "--service", SERVICE_NAME) == (0, "SERVING", "")
    code, out, _ = _health(capsys, "--server", tiny_server.address, "--service", "no.such.Service")
    assert (code, out) == (1, "SERVICE_UNKNOWN")
    assert _health(capsys, "--server", tiny_server.address, "--quiet") == (0, "", "")


def test_loading_server_is_not_serving_until_the_engine_is_attached(tiny_model_dir, capsys):
    server = ServerThread(None)                             # bound and answering probes, no model yet
    engine = None
    try:
        assert _health(capsys, "--server", server.address)[:2] == (1, "NOT_SERVING")
        engine = AsyncEngine(tiny_engine_args(tiny_model_dir, num_kv_blocks=32))
        timer = threading.Timer(1.0, lambda: server.call(server.server.attach(engine)))
        timer.start()
        start = time.monotonic()
        assert _health(capsys, "--server", server.address, "--wait", "30")[:2] == (0, "SERVING")
        assert 0.5 < time.monotonic() - start < 20                      # it waited for the attach
        timer.join()
    finally:
        server.stop(grace=0.5)
        if engine is not None:
            engine.shutdown()


def test_draining_server_is_not_serving_then_unreachable(tiny_model_dir, capsys):
    server = ServeProcess("--model", tiny_model_dir, "--backend", "cpu", "--num-kv-blocks", "256",
                          "--grace-period", "90")
    try:
        address = server.wait_event("server_ready", timeout=60)["address"]
        ok = _health_process("--server", address)
        assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
        with Client(address, retry=RetryPolicy(max_attempts=1)) as client:
            stream = client.generate("The cat watches", max_tokens=480, ignore_eos=True, temperature=0)
            chunks = [next(stream)]
            server.proc.send_signal(signal.SIGTERM)
            server.wait_event("server_draining", timeout=10)
            # probed in this process: the drain lasts only while the engine still generates (a fraction of a
            # second on the tiny model), shorter than a new interpreter's start-up
            assert _health(capsys, "--server", address)[:2] == (1, "NOT_SERVING")
            chunks += list(stream)                                  # the running stream still finishes
            assert chunks[-1].finish_reason == "length"
        assert server.proc.wait(timeout=60) == 0
        gone = _health_process("--server", address, "--timeout", "2")
        assert (gone.returncode, gone.stdout.strip()) == (1, "UNREACHABLE")
        assert address in gone.stderr and "UNAVAILABLE" in gone.stderr
    finally:
        server.kill()


def test_unreachable_server_exits_1_with_the_reason(capsys):
    address = f"127.0.0.1:{_free_port()}"                   # nothing listens there
    code, out, err = _health(capsys, "--server", address)
    assert (code, out) == (1, "UNREACHABLE") and address in err
    start = time.monotonic()
    code, out, _ = _health(capsys, "--server", address, "--wait", "1.5")
    assert (code, out) == (1, "UNREACHABLE") and 1.0 < time.monotonic() - start < 10
    code, out, err = _health(capsys, "--server", f"unix:/nonexistent-dir-{address}/pagedgen.sock")
    assert (code, out) == (1, "UNREACHABLE")


def test_tls_and_api_key_options(tiny_model_dir, pki, capsys):  # noqa: F811
    ours, stranger = pki["ours"], pki["stranger"]
    options = ServerOptions(port=0, api_key="k3y", tls_cert_file=ours["server"], tls_key_file=ours["server_key"],
                            tls_client_ca_file=ours["ca"])
    with serving(tiny_model_dir, options, grace=0.5, num_kv_blocks=32) as server:
        mtls = ["--tls-ca", ours["ca"], "--tls-cert", ours["client"], "--tls-key", ours["client_key"]]
        assert _health(capsys, "--server", server.address, *mtls)[:2] == (0, "SERVING")
        assert _health(capsys, "--server", server.address, *mtls, "--api-key", "k3y")[:2] == (0, "SERVING")
        # No client certificate, a stranger's, or plaintext: the handshake fails.
        assert _health(capsys, "--server", server.address, "--tls-ca", ours["ca"])[:2] == (1, "UNREACHABLE")
        impostor = ["--tls-ca", ours["ca"], "--tls-cert", stranger["client"], "--tls-key", stranger["client_key"]]
        assert _health(capsys, "--server", server.address, *impostor)[:2] == (1, "UNREACHABLE")
        assert _health(capsys, "--server", server.address)[:2] == (1, "UNREACHABLE")


@pytest.mark.parametrize("args", [["--tls-cert", "c.pem"], ["--tls-cert", "c.pem", "--tls-key", "k.pem"],
                                  ["--timeout", "0"], ["--server", "unix:"]])
def test_bad_options_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(["health", *args])
    assert info.value.code == 2
