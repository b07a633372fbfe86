"""How tensor-parallel ranks are started and find each other, without importing torch.

Two ways, both read here: the driver (``executor.TPBackend``) spawns its
workers (``python -m backends.tp.worker --rank R ...``), or ``torchrun``
starts every rank with its variables set; then the ``pagedgen`` command line
asks ``torchrun_rank()`` which one it is and runs rank 0 as the driver and
every other rank as a worker (``worker.run_torchrun_worker``). These are
torch's variables, not pagedgen's (``common.envs`` holds those). Light on
purpose: the command line reads it before it knows whether torch is needed.
"""

from __future__ import annotations

import os

# What torchrun sets for every rank it starts (the env:// rendezvous reads them).
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether torch's launcher set this process's rank."""
    return all(name in os.environ for name in TORCHRUN_VARS)


def torchrun_rank() -> tuple[int, int] | None:
    """``(rank, world_size)`` from torchrun's variables; None when torchrun did not start this process."""
    if not launched_by_torchrun():
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise ValueError(f"torchrun's RANK and WORLD_SIZE must be integers, got RANK={os.environ['RANK']!r} "
                         f"WORLD_SIZE={os.environ['WORLD_SIZE']!r}") from None


def ready_key(rank: int) -> str:
    """The store key a worker sets (to its pid) once it is about to join the group; the driver waits for them."""
    return f"pagedgen/tp/ready/{rank}"
