"""The run half of `make image-test` (scripts/image_test.sh builds the image, then calls this).

Starts `pagedgen serve` inside the image through its entrypoint (``buildah run
--isolation chroot``: host network), checks it from outside with the real
client and `pagedgen health`, compares a greedy streamed Generate with the same
request against `.venv/bin/pagedgen serve` outside the image (whose native
kernels this machine's compiler builds for its own CPU), checks from the
server's log that the image runs the native cpu kernels from its prebuilt
library (it has no compiler), puts 16 concurrent streams on it, stops it with SIGTERM during a stream, and prints the
figures: image size, build time, start to SERVING, RSS idle and under load.
Any failed check exits non-zero with what differed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from pagedgen_client import Client, PagedgenClientError, RetryPolicy

ROOT = Path(__file__).resolve().parents[1]
PAGEDGEN = str(ROOT / ".venv" / "bin" / "pagedgen")
# The same engine flags inside and outside the image (the sidecar manifest's), so outputs are comparable.
SERVE_FLAGS = ["--kv-cache-memory", "512MiB", "--grace-period", "30", "--log-format", "json"]
SOCKET_IN = "/run/pagedgen/pagedgen.sock"     # inside the image; <work>/run/pagedgen.sock outside
PROMPT = "The capital of France is"
NO_RETRY = RetryPolicy(max_attempts=1)


def fail(message: str) -> None:
    raise SystemExit(f"image-test: FAILED: {message}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def container_pids(runner_pid: int) -> list[int]:
    """The processes under ``buildah run`` that are the container's own, not buildah's helpers
    (``buildah-chroot-runtime``, ``buildah-chroot-exec``: their argv[0] says so)."""
    tree, found, todo = children(), [], [runner_pid]
    while todo:
        pid = todo.pop()
        for child in tree.get(pid, []):
            todo.append(child)
            try:
                argv0 = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if not os.path.basename(argv0).startswith(b"buildah"):
                found.append(child)
    return found


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def serve_pid(runner_pid: int) -> int:
    for pid in container_pids(runner_pid):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"serve" in argv:
            return pid
    fail("no `pagedgen serve` process under buildah run")
    raise AssertionError


def wait_serving(target: str, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until health says SERVING (polled every 0.1 s); fails if the process exits first."""
    start = time.monotonic()
    with Client(target, retry=NO_RETRY) as client:
        while time.monotonic() - start < timeout:
            if proc.poll() is not None:
                fail(f"server exited with {proc.returncode} before SERVING")
            try:
                if client.health(timeout=1.0) == "SERVING":
                    return time.monotonic() - start
            except PagedgenClientError:
                pass
            time.sleep(0.1)
    fail(f"{target} not SERVING after {timeout:.0f} s")
    raise AssertionError


def health(*args: str) -> tuple[int, str]:
    """`pagedgen health ARGS` (a 30 s call deadline unless ARGS set one: CI's cores may be busy)."""
    timeout = [] if "--timeout" in args else ["--timeout", "30"]
    done = subprocess.run([PAGEDGEN, "health", *timeout, *args], capture_output=True, text=True, timeout=90)
    return done.returncode, done.stdout.strip()


def expect_health(expected: tuple[int, str], *args: str) -> None:
    got = health(*args)
    if got != expected:
        fail(f"pagedgen health {' '.join(args)}: got {got}, expected {expected}")


def greedy(client: Client) -> tuple[list[int], str]:
    chunks = list(client.generate(PROMPT, max_tokens=48, temperature=0, timeout=120))
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


def load(client: Client, runner_pid: int, streams: int = 16, max_tokens: int = 96) -> dict:
    """``streams`` concurrent streams; the container's peak RSS, sampled every 0.2 s meanwhile."""
    counts: list[int] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            counts.append(sum(len(c.token_ids) for c in client.generate(
                f"Story {i}: once upon a time", max_tokens=max_tokens, ignore_eos=True, temperature=0, timeout=600)))
        except BaseException as e:          # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    start, peak = time.monotonic(), 0
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_bytes(container_pids(runner_pid)))
        time.sleep(0.2)
    seconds = time.monotonic() - start
    if errors or counts != [max_tokens] * streams:
        fail(f"load: {len(errors)} failed streams ({errors[:1]}), token counts {counts}")
    return {"peak_rss": peak, "seconds": seconds, "tok_s": streams * max_tokens / seconds}


def prebuilt_kernels(log_path: Path) -> str:
    """The prebuilt kernel library the server in the image loaded, from its log; fails where the log says
    the kernels were unavailable or built (a compiler in the image) or says nothing of them."""
    lines = log_path.read_text(errors="replace").splitlines()
    for line in lines:
        if "cpu_kernel_unavailable" in line or "cpu_kernel_built" in line:
            fail(f"the image did not run its prebuilt native kernels: {line.strip()[:600]}")
    for line in lines:
        if "cpu_kernel_prebuilt_loaded" in line:
            try:
                event = json.loads(line[line.index("{"):])
                return f"{event['path']} ({event['target']})"
            except (ValueError, KeyError):
                return line.strip()[:300]
    fail("the server's log has no cpu_kernel_prebuilt_loaded: the image runs the torch path, not the native kernels")
    raise AssertionError


def outside_greedy(port: int) -> tuple[list[int], str, float]:
    """The same greedy request against `.venv/bin/pagedgen serve` outside the image."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PAGEDGEN_API_KEY", None)
    env.pop("PAGEDGEN_API_KEY_FILE", None)
    proc = subprocess.Popen([PAGEDGEN, "serve", "--port", str(port), *SERVE_FLAGS], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        start_s = wait_serving(f"127.0.0.1:{port}", proc, 300)
        expect_health((0, "SERVING"), "--server", f"127.0.0.1:{port}")
        with Client(f"127.0.0.1:{port}") as client:
            ids, text = greedy(client)
        proc.send_signal(signal.SIGTERM)
        if proc.wait(timeout=60) != 0:
            fail(f"the server outside the image exited with {proc.returncode}")
        return ids, text, start_s
    finally:
        if proc.poll() is None:
            proc.kill()


def drain(client: Client, runner: subprocess.Popen, port: int, tokens: int, grace_s: float = 30.0) -> float:
    """SIGTERM during a stream of ``tokens``: NOT_SERVING, the stream finishes, exit 0 within the grace period."""
    stream = client.generate(PROMPT, max_tokens=tokens, ignore_eos=True, temperature=0, timeout=120)
    chunks = [next(stream)]
    os.kill(serve_pid(runner.pid), signal.SIGTERM)
    start = time.monotonic()
    expect_health((1, "NOT_SERVING"), "--server", f"127.0.0.1:{port}")
    chunks += list(stream)
    if chunks[-1].finish_reason != "length" or sum(len(c.token_ids) for c in chunks) != tokens:
        fail("the stream running at SIGTERM did not finish")
    try:
        code = runner.wait(timeout=grace_s + 5)
    except subprocess.TimeoutExpired:
        fail(f"still running {grace_s + 5:.0f} s after SIGTERM")
    if code != 0:
        fail(f"`pagedgen serve` in the image exited with {code} after SIGTERM")
    return time.monotonic() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--container", required=True, help="a buildah working container of the image")
    p.add_argument("--entrypoint", required=True, help="the image's entrypoint, as JSON")
    p.add_argument("--work", required=True, type=Path, help="holds run/ (the socket), tmp/, secrets/api-key")
    p.add_argument("--build-s", type=float, required=True)
    p.add_argument("--image-size", required=True, help="as buildah images shows it")
    args = p.parse_args()
    key = (args.work / "secrets" / "api-key").read_text().strip()
    port_in, port_out = free_port(), free_port()
    tcp, uds = f"127.0.0.1:{port_in}", f"unix:{args.work / 'run' / 'pagedgen.sock'}"
    runtime = ["buildah", "run", "--isolation", "chroot",
               "-v", f"{args.work}/run:/run/pagedgen", "-v", f"{args.work}/tmp:/tmp",
               "-v", f"{args.work}/secrets:/run/secrets/pagedgen:ro",
               "-e", "PAGEDGEN_API_KEY_FILE=/run/secrets/pagedgen/api-key", args.container, "--"]
    command = [*runtime, *json.loads(args.entrypoint), *SERVE_FLAGS, "--port", str(port_in), "--uds", SOCKET_IN]
    passed: list[str] = []          # the checks that held, in order
    log = open(args.work / "serve-in.log", "w")
    runner = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        start_s = wait_serving(tcp, runner, 600)
        passed.append("SERVING through the entrypoint")
        time.sleep(1.0)
        idle_rss = rss_bytes(container_pids(runner.pid))
        print(f"image-test: SERVING {start_s:.1f} s after start; RSS idle {idle_rss / 2**20:.0f} MiB", flush=True)

        for target in (tcp, uds):
            expect_health((0, "SERVING"), "--server", target)
            expect_health((0, "SERVING"), "--server", target, "--service", "pagedgen.v1.Generate")
            passed.append(f"pagedgen health {target}: 0")
        expect_health((1, "SERVICE_UNKNOWN"), "--server", tcp, "--service", "no.such.Service")
        passed.append("pagedgen health, unknown service: 1")
        inside_probe = subprocess.run([*runtime, "pagedgen", "health", "--quiet", "--timeout", "30", "--server", tcp],
                                      capture_output=True, timeout=120)
        if inside_probe.returncode != 0:
            fail(f"the HEALTHCHECK command inside the image exited with {inside_probe.returncode}")
        passed.append("the HEALTHCHECK command inside the image: 0")

        with Client(tcp, retry=NO_RETRY) as stranger:
            try:
                stranger.generate_text(PROMPT, max_tokens=2)
                fail("a call without the API key was served")
            except PagedgenClientError as e:
                if e.code != grpc.StatusCode.UNAUTHENTICATED:
                    fail(f"a call without the API key got {e.code}, not UNAUTHENTICATED")
        passed.append("no API key: UNAUTHENTICATED (the key came from the mounted file)")
        with Client(tcp, api_key=key) as client, Client(uds, api_key=key) as over_socket:
            start = time.monotonic()
            ids_in, text_in = greedy(client)
            # The drain's stream should last ~8 s: long enough for `pagedgen health` to see NOT_SERVING,
            # well within the 30 s grace period even when this machine's cores are shared.
            drain_tokens = max(16, min(400, int(8 * len(ids_in) / (time.monotonic() - start))))
            if greedy(over_socket) != (ids_in, text_in):
                fail("the Unix socket streamed something else than TCP")
            passed.append("greedy stream over the Unix socket = over TCP")
            kernels = prebuilt_kernels(args.work / "serve-in.log")
            passed.append("the native cpu kernels run in the image, from its prebuilt library")
            print(f"image-test: native cpu kernels in the image: {kernels}", flush=True)
            ids_out, text_out, out_start_s = outside_greedy(port_out)
            if ids_in != ids_out:
                fail(f"greedy output differs: image {text_in!r} vs outside {text_out!r}")
            passed.append("greedy stream in the image = outside the image")
            print(f"image-test: greedy stream equal inside and outside the image ({len(ids_in)} tokens): "
                  f"{PROMPT}{text_in!r}", flush=True)
            busy = load(client, runner.pid)
            passed.append("16 concurrent streams complete")
            print(f"image-test: 16 streams x 96 tokens in {busy['seconds']:.1f} s ({busy['tok_s']:.1f} tok/s), "
                  f"peak RSS {busy['peak_rss'] / 2**20:.0f} MiB", flush=True)
            stop_s = drain(client, runner, port_in, drain_tokens)
            passed.append("SIGTERM: NOT_SERVING, the running stream finishes, exit 0 within the grace period")
        expect_health((1, "UNREACHABLE"), "--server", tcp, "--timeout", "2")
        if (args.work / "run" / "pagedgen.sock").exists():
            fail("the socket file outlived the server")
        passed.append("stopped: unreachable, socket removed")
        print(f"image-test: SIGTERM during a stream: NOT_SERVING, stream finished, exit 0 after {stop_s:.1f} s")
        print("image-test: figures:")
        print(f"  image size          {args.image_size} (uncompressed)")
        print(f"  build time          {args.build_s:.0f} s")
        print(f"  start to SERVING    {start_s:.1f} s in the image ({out_start_s:.1f} s for .venv outside)")
        print(f"  RSS idle            {idle_rss / 2**20:.0f} MiB (server + engine process)")
        print(f"  RSS, 16 streams     {busy['peak_rss'] / 2**20:.0f} MiB peak")
        (args.work / "checks-passed").write_text(f"{len(passed)}\n")
        return 0
    finally:
        if runner.poll() is None:
            for pid in container_pids(runner.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            runner.kill()
            runner.wait(timeout=30)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
