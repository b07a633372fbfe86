"""A tensor-parallel worker process: ranks 1 .. N-1 of the group.

Started one of two ways. The driver (``TPBackend``) spawns it as ``python -m
backends.tp.worker --rank R --world-size N --master-addr ADDR --master-port
PORT --parent-pid PID`` (``main``). Or ``torchrun`` starts every rank of the
group, on any node, with the same ``pagedgen`` command line (see the
README)::

    torchrun ... -m cli serve --tensor-parallel-size N --model DIR

and the command line (``cli.main``) runs rank 0 as the engine and hands
every other rank to ``run_torchrun_worker`` (``env://`` rendezvous).

A worker's life: join the group, receive the model config and its weight
shard from the driver, then obey the driver's broadcast commands
(``allocate``, ``step``, ``shutdown``) until told to stop. It exits when a
collective fails (the driver or another rank died: its sockets close) and,
when the driver spawned it, as soon as the driver process is gone.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import structlog

from backends.tp.launch import ready_key

log = structlog.get_logger("pagedgen.tp.worker")

PARENT_POLL_S = 0.5


def serve_rank(group) -> int:
    """Run rank ``group.rank`` until the driver says ``shutdown``; the process exit code."""
    import torch

    from backends.tp.comm import FOREVER, SETUP_TIMEOUT
    from backends.tp.rank import RankRunner
    from backends.tp.sharding import shard_config
    from model.config import ModelConfig
    from model.weights.canonical import expected_shapes

    init = group.broadcast_object(timeout=SETUP_TIMEOUT)
    config = ModelConfig.from_dict(init["config"])
    shard = shard_config(config, group.world_size)
    weights = group.recv_arrays(expected_shapes(shard))
    runner = RankRunner(shard, weights, group, vocab_size=config.vocab_size, dtype=init["dtype"],
                        num_threads=init["num_threads"])
    del weights
    log.info("tp_worker_ready", rank=group.rank, world_size=group.world_size, pid=os.getpid(),
             num_threads=torch.get_num_threads())
    while True:
        command, *payload = group.broadcast_object(timeout=FOREVER)
        if command == "step":
            runner.run(payload[0])
        elif command == "allocate":
            runner.allocate_kv_cache(*payload)
        elif command == "shutdown":
            runner.shutdown()
            return 0
        else:
            raise ValueError(f"unknown tensor-parallel command {command!r}")


def _exit_with_parent(parent_pid: int) -> None:
    """Exit this process as soon as ``parent_pid`` is no longer its parent (the driver died)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(3)

    threading.Thread(target=watch, name="pagedgen-tp-parent-watch", daemon=True).start()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m backends.tp.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--master-addr", required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the driver) is gone")
    return p.parse_args(argv)


def run_torchrun_worker() -> int:
    """Serve this torchrun rank (not 0) as a worker of the driver at ``MASTER_ADDR:MASTER_PORT``; the exit code."""
    from backends.tp import comm
    from backends.tp.launch import torchrun_rank

    launched = torchrun_rank()
    if launched is None or launched[0] == 0:
        raise ValueError("run_torchrun_worker serves torchrun's ranks 1 .. N-1 (rank 0 runs the engine)")
    store, rank, world_size = comm.env_store()
    return _serve(store, rank, world_size, host=None)


def _serve(store, rank: int, world_size: int, host: str | None) -> int:
    """Announce this rank, join the group and serve it; a failure is logged and exits non-zero."""
    from backends.tp import comm

    try:
        store.set(ready_key(rank), str(os.getpid()))
        return serve_rank(comm.TPGroup(store, rank, world_size, host))
    except Exception as e:  # noqa: BLE001 - a worker reports why it stops, then exits non-zero
        log.error("tp_worker_exit", rank=rank, error=repr(e)[:500])
        return 1


def main(argv: list[str] | None = None) -> int:
    """A worker the driver spawned (torchrun's ranks start through the ``pagedgen`` command line instead)."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    from backends.tp import comm

    args = _parse(argv)
    if args.parent_pid is not None:
        _exit_with_parent(args.parent_pid)
    store = comm.create_store(args.master_addr, args.master_port, args.world_size, is_driver=False)
    return _serve(store, args.rank, args.world_size, args.master_addr)


if __name__ == "__main__":
    sys.exit(main())
