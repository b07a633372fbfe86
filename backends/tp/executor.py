"""``TPBackend``: one model split over ``tensor_parallel_size`` ranks, behind the ``Backend`` protocol.

The driver is rank 0 and lives in the engine process: the engine's scheduler
and block manager run once, here; ``execute`` broadcasts each step's model
inputs (``rank.model_inputs_only``) to the workers, runs rank 0's shard
alongside them, gathers the vocabulary shards of the logits and samples.
Ranks 1 .. N-1 are worker processes (``backends/tp/worker.py``), spawned here
with ``1/N`` of the CPU threads each, or started by ``torchrun`` on other
nodes (then every rank meets at ``MASTER_ADDR:MASTER_PORT``).

The driver sends each worker its weight shard over the group (the checkpoint
is read once, by the engine); ``kv_cache_memory`` is a per-rank budget, and
every rank holds the same number of blocks of ``num_kv_heads / N`` heads.

A dead rank is fatal: ``execute`` checks the spawned workers before each step,
a collective that fails (a peer's sockets closed) or times out raises
``TensorParallelError``, an ``EngineDeadError``, and from then on every call
raises it again; the engine stops and the service turns ``NOT_SERVING``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import structlog
import torch

from backends.base import Backend, BackendOptions, blocks_for_memory, run_step
from backends.cpu.backend import DEFAULT_DTYPE, available_cores
from backends.sampler import Sampler
from backends.tp import comm
from backends.tp.launch import launched_by_torchrun, ready_key
from backends.tp.rank import RankRunner, model_inputs_only
from backends.tp.sharding import check_tp_size, shard_config, shard_weights
from common.errors import EngineDeadError
from model.config import ModelConfig
from scheduler.output import SchedulerOutput, StepResult

log = structlog.get_logger(__name__)

SHUTDOWN_GRACE_S = 10.0      # a worker told to stop gets this long before it is killed
DEATH_GRACE_S = 2.0          # after a failed collective, how long to wait for a worker's exit to name it
_REPO_ROOT = Path(__file__).resolve().parents[2]


class TensorParallelError(EngineDeadError):
    """A tensor-parallel rank died or stopped answering; the engine cannot continue."""


def describe_exit(returncode: int) -> str:
    """``exited with code 1`` / ``killed by SIGKILL``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _stop_processes(procs: list[subprocess.Popen], grace_s: float) -> None:
    """Wait up to ``grace_s`` for ``procs`` to exit, then kill and reap the rest."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class TPBackend(Backend):
    """``Backend`` over N tensor-parallel ranks (see ``backends/base.py`` for the life cycle)."""

    name = "cpu"

    def __init__(
        self,
        model_config: ModelConfig,
        weights: dict[str, np.ndarray],
        *,
        tensor_parallel_size: int,
        dtype: str = DEFAULT_DTYPE,
        seed: int = 0,
        num_threads: int | None = None,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        check_tp_size(model_config, tensor_parallel_size)
        self.dtype = dtype
        self.model_config = model_config
        self.world_size = tensor_parallel_size
        self.num_threads = max(1, (num_threads or available_cores()) // tensor_parallel_size)   # per rank
        self.sampler = Sampler(eos_token_ids or model_config.eos_token_ids, seed=seed)
        self.workers: list[subprocess.Popen] = []          # spawned ranks 1 .. N-1 (none under torchrun)
        self._error: TensorParallelError | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _stop_processes, self.workers, 0.0)
        t0 = time.perf_counter()
        try:
            self.group = self._join_group()
            self.group.broadcast_object({"config": model_config.to_dict(), "dtype": dtype,
                                         "num_threads": self.num_threads}, timeout=comm.SETUP_TIMEOUT)
            for rank in range(1, tensor_parallel_size):
                self.group.send_arrays(shard_weights(model_config, weights, rank, tensor_parallel_size), rank)
            self.runner = RankRunner(shard_config(model_config, tensor_parallel_size),
                                     shard_weights(model_config, weights, 0, tensor_parallel_size), self.group,
                                     vocab_size=model_config.vocab_size, dtype=dtype, num_threads=self.num_threads)
        except BaseException:
            self._kill_workers()
            raise
        log.info("tp_ready", world_size=tensor_parallel_size, worker_pids=self.worker_pids,
                 threads_per_rank=self.num_threads, setup_s=round(time.perf_counter() - t0, 2))

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.workers]

    # -- setup -------------------------------------------------------------------

    def _join_group(self) -> comm.TPGroup:
        n = self.world_size
        if launched_by_torchrun():
            store, rank, world_size = comm.env_store()
            if rank != 0 or world_size != n:
                raise ValueError(f"under torchrun the engine must be rank 0 of a world of tensor_parallel_size={n} "
                                 f"processes, got rank {rank} of {world_size}")
            self._wait_ready(store)
            return comm.TPGroup(store, 0, n, host=None)
        host = "127.0.0.1"
        store = comm.create_store(host, 0, n, is_driver=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.num_threads),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO_ROOT), os.environ.get("PYTHONPATH")])))
        for rank in range(1, n):
            self.workers.append(subprocess.Popen(
                [sys.executable, "-m", "backends.tp.worker", "--rank", str(rank), "--world-size", str(n),
                 "--master-addr", host, "--master-port", str(store.port), "--parent-pid", str(os.getpid())],
                env=env, cwd=_REPO_ROOT, stdin=subprocess.DEVNULL,
                stdout=2,                     # the driver's stderr: a worker never writes into CLI output
                start_new_session=True,       # a terminal's Ctrl-C reaches the driver only; it stops them
            ))
        self._wait_ready(store)
        return comm.TPGroup(store, 0, n, host=host)

    def _wait_ready(self, store) -> None:
        """Block until every worker announced itself; fail fast if a spawned one exits first."""
        keys = [ready_key(r) for r in range(1, self.world_size)]
        deadline = time.monotonic() + comm.SETUP_TIMEOUT.total_seconds()
        while not store.check(keys):
            for rank, p in enumerate(self.workers, start=1):
                if p.poll() is not None:
                    raise TensorParallelError(f"tensor-parallel worker rank {rank} (pid {p.pid}) "
                                              f"{describe_exit(p.returncode)} while starting")
            if time.monotonic() > deadline:
                raise TensorParallelError(f"tensor-parallel workers did not join within "
                                          f"{comm.SETUP_TIMEOUT.total_seconds():.0f} s")
            time.sleep(0.05)

    # -- Backend -------------------------------------------------------------------

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes one KV block costs on one rank (``num_kv_heads / N`` heads, all layers)."""
        return self.runner.kv_block_bytes(block_size)

    def num_blocks_for_memory(self, memory_bytes: int, block_size: int) -> int:
        """How many KV blocks fit ``memory_bytes`` on each rank."""
        return blocks_for_memory(memory_bytes, self.kv_block_bytes(block_size))

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Every rank allocates ``num_blocks`` blocks of its KV heads."""
        self._collective(lambda: (self.group.broadcast_object(("allocate", num_blocks, block_size)),
                                  self.runner.allocate_kv_cache(num_blocks, block_size)))

    def execute(self, scheduler_output: SchedulerOutput) -> StepResult:
        """Run one step on all ranks; sample on the driver."""
        return run_step(scheduler_output, self.sampler.drop, self._run_model, self.sampler.sample_rows)

    def _run_model(self, scheduler_output: SchedulerOutput) -> torch.Tensor | None:
        """Every rank runs its shard; the driver gets logits ``[N, V]`` (None when no row samples)."""
        step = model_inputs_only(scheduler_output)

        def run() -> torch.Tensor | None:
            self.group.broadcast_object(("step", step))
            return self.runner.run(step)                                         # [N, V] or None

        return self._collective(run)

    def shutdown(self) -> None:
        """Tell the workers to stop, reap them (killing any that linger), free rank 0's shard."""
        if self._closed:
            return
        self._closed = True
        if self._error is None and self.world_size > 1:
            try:
                self.group.broadcast_object(("shutdown",))
            except Exception:  # noqa: BLE001 - a worker that cannot hear it is killed below
                pass
        _stop_processes(self.workers, SHUTDOWN_GRACE_S)
        self.runner.shutdown()
        self.sampler.clear()

    # -- failure -------------------------------------------------------------------

    def check_health(self) -> None:
        """Raise ``TensorParallelError`` if a rank has died (now or before)."""
        if self._error is not None:
            raise self._error
        if self._closed:
            raise TensorParallelError("the tensor-parallel backend is shut down")
        for rank, p in enumerate(self.workers, start=1):
            if p.poll() is not None:
                raise self._fail(f"tensor-parallel worker rank {rank} (pid {p.pid}) {describe_exit(p.returncode)}")

    def _collective(self, fn):
        """Run ``fn`` (driver's side of a command); any failure is fatal for the whole group."""
        self.check_health()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - ranks are out of step now: nothing can be retried
            deadline = time.monotonic() + DEATH_GRACE_S
            while time.monotonic() < deadline and all(p.poll() is None for p in self.workers):
                time.sleep(0.05)
            dead = [(r, p) for r, p in enumerate(self.workers, start=1) if p.poll() is not None]
            if dead:
                what = "; ".join(f"worker rank {r} (pid {p.pid}) {describe_exit(p.returncode)}" for r, p in dead)
            else:
                what = f"a collective failed ({str(e).splitlines()[0][:200]})"
            raise self._fail(f"tensor-parallel {what}") from e

    def _fail(self, message: str) -> TensorParallelError:
        self._error = TensorParallelError(f"{message}; the engine cannot run without every rank")
        log.error("tp_rank_failed", error=message, world_size=self.world_size)
        self._kill_workers()
        return self._error

    def _kill_workers(self) -> None:
        for p in self.workers:
            if p.poll() is None:
                p.kill()
        _stop_processes(self.workers, 0.0)


def create(model_config: ModelConfig, weights: dict[str, np.ndarray], options: BackendOptions) -> TPBackend:
    """The registry's tensor-parallel factory of the cpu device: every rank runs the cpu backend's model."""
    return TPBackend(model_config, weights, tensor_parallel_size=options.tensor_parallel_size,
                     dtype=options.resolve_dtype(DEFAULT_DTYPE), seed=options.seed,
                     num_threads=options.num_threads, eos_token_ids=options.eos_token_ids)
