"""`pagedgen serve` as a process: ready line, SIGTERM drain, exit code 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from pagedgen_client import Client, PagedgenClientError, RetryPolicy

ROOT = Path(__file__).resolve().parents[2]


class ServeProcess:
    """``python -m cli serve ... --port 0 --log-format json``, its log lines collected."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--port", "0", "--log-format", "json", *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"event": "non-json", "line": line})

    def wait_event(self, name: str, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = [e for e in self.events if e.get("event") == name]
            if found:
                return found[0]
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {name!r} event; exit={self.proc.poll()} events={self.events[-10:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _serve_and_drain(*serve_args: str, prompt: str, max_tokens: int, startup_timeout: float):
    server = ServeProcess(*serve_args)
    try:
        ready = server.wait_event("server_ready", timeout=startup_timeout)
        with Client(ready["address"], retry=RetryPolicy(max_attempts=1)) as client:
            assert client.health() == "SERVING"
            stream = client.generate(prompt, max_tokens=max_tokens, ignore_eos=True, temperature=0)
            chunks = [next(stream)]
            server.proc.send_signal(signal.SIGTERM)
            server.wait_event("server_draining", timeout=10)
            with pytest.raises(PagedgenClientError) as info:        # new work is refused
                list(client.generate(prompt, max_tokens=2))
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            chunks += list(stream)                                  # the running stream finishes
            assert chunks[-1].finish_reason == "length"
            assert sum(len(c.token_ids) for c in chunks) == max_tokens
        assert server.proc.wait(timeout=30) == 0
        assert server.proc.stdout.read() == ""                      # logs never go to stdout
        server.wait_event("server_stopped", timeout=5)
        return ready
    finally:
        server.kill()


@pytest.mark.timeout(120)
def test_sigterm_drains_running_streams_and_exits_0(tiny_model_dir):
    ready = _serve_and_drain("--model", tiny_model_dir, "--backend", "cpu", "--num-kv-blocks", "256",
                             "--grace-period", "20", prompt="The cat watches", max_tokens=400, startup_timeout=60)
    assert ready["address"].startswith("127.0.0.1:") and ready["model"] == "tiny-llama"


@pytest.mark.timeout(120)
def test_sigterm_during_16_streams_completes_every_one(tiny_model_dir):
    server = ServeProcess("--model", tiny_model_dir, "--backend", "cpu", "--num-kv-blocks", "512",
                          "--grace-period", "30")
    try:
        ready = server.wait_event("server_ready", timeout=60)
        with Client(ready["address"], retry=RetryPolicy(max_attempts=1)) as client:
            # 480 tokens (16 x ~490 fit the 512 blocks and the model's 512 positions): long enough that none
            # ends before the client has read every stream's first chunk on a fast machine (160 did)
            streams = [client.generate(f"The cat watches {i}", max_tokens=480, ignore_eos=True, temperature=0)
                       for i in range(16)]
            chunks = [[next(stream)] for stream in streams]            # all 16 are running
            assert client.stats().num_running == 16
            server.proc.send_signal(signal.SIGTERM)
            server.wait_event("server_draining", timeout=10)
            with pytest.raises(PagedgenClientError) as info:
                list(client.generate("one more", max_tokens=2))
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            for mine, stream in zip(chunks, streams):
                mine += list(stream)
                assert mine[-1].finish_reason == "length"
                assert sum(len(c.token_ids) for c in mine) == 480
        assert server.proc.wait(timeout=30) == 0
        assert server.wait_event("server_stopped", timeout=5)["drained"] is True
    finally:
        server.kill()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_the_default_model():
    ready = _serve_and_drain("--kv-cache-memory", "256MiB", "--grace-period", "60",
                             prompt="Once upon a time", max_tokens=24, startup_timeout=300)
    assert ready["model"].startswith("SmolLM2")


@pytest.mark.timeout(60)
def test_unbindable_port_fails_cleanly(tiny_model_dir):
    server = ServeProcess("--model", tiny_model_dir, "--backend", "cpu", "--num-kv-blocks", "16",
                          "--host", "203.0.113.1")                    # not an address of this machine
    try:
        assert server.proc.wait(timeout=50) != 0
    finally:
        server.kill()
