"""A ``pagedgen serve`` child process for a benchmark, timed from spawn to SERVING.

``bench serve --launch`` (and ``--compare offline``) start the server
themselves, so one command measures the whole path: process start, model
load, health SERVING, then the load. The server runs in its own process, as
in production; its log goes to a temporary file whose tail is shown if it
fails to start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from engine.args import EngineArgs

# Engine options a bench command does not take as engine flags: its ``--seed`` is the
# dataset's (``bench.datasets``), which seeds the offline engine too but not a launched server.
NOT_ENGINE_FLAGS = ("seed",)


def add_engine_args(group) -> None:
    """The engine's flags (``EngineArgs.add_cli_args``, as ``pagedgen serve`` has them) in ``group``."""
    EngineArgs.add_cli_args(group, exclude=NOT_ENGINE_FLAGS)


def serve_flags(args) -> list[str]:
    """``pagedgen serve`` flags for the engine options in ``args`` (those not at their defaults)."""
    return EngineArgs.from_cli_args(args).to_cli_flags(exclude=NOT_ENGINE_FLAGS)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LaunchedServer:
    process: subprocess.Popen
    address: str
    log_path: str
    start_to_serving_s: float | None = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout``; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        try:
            os.unlink(self.log_path)
        except OSError:
            pass
        return self.process.returncode


def launch(flags: list[str], *, timeout: float = 300.0) -> LaunchedServer:
    """Start ``pagedgen serve FLAGS`` on a free loopback port and wait for SERVING."""
    from pagedgen_client import Client, PagedgenClientError

    port = free_port()
    fd, log_path = tempfile.mkstemp(prefix="pagedgen-bench-serve-", suffix=".log")
    cmd = [sys.executable, "-m", "cli.main", "serve", "--port", str(port), *flags]
    t0 = time.perf_counter()
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = LaunchedServer(proc, f"127.0.0.1:{port}", log_path)
    with Client(server.address) as client:
        while True:
            if proc.poll() is not None:
                tail = server.log_tail()
                server.stop()
                raise RuntimeError(f"pagedgen serve exited with {proc.returncode} before SERVING:\n{tail}")
            try:
                if client.health(timeout=1.0) == "SERVING":
                    break
            except PagedgenClientError:
                pass
            if time.perf_counter() - t0 > timeout:
                tail = server.log_tail()
                server.stop()
                raise TimeoutError(f"pagedgen serve not SERVING after {timeout:.0f}s:\n{tail}")
            time.sleep(0.05)
    server.start_to_serving_s = time.perf_counter() - t0
    return server
