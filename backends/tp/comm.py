"""The collectives tensor parallelism needs, over one ``torch.distributed`` process group.

``TPGroup`` wraps a standalone ``ProcessGroupGloo`` (not the process-global
default group, so several engines can live in one process, e.g. in tests).
Rendezvous goes through a ``TCPStore``: the driver (rank 0) hosts one on a
free loopback port and spawns the workers with its address, or, under
``torchrun``, every rank meets at ``MASTER_ADDR:MASTER_PORT`` (``env://``;
``launch`` reads torchrun's variables).

Every call takes a timeout, so a dead or stuck peer turns into an exception
instead of a hang: a peer that exits closes its sockets and the pending
collective fails at once; a hung peer fails it after ``timeout``. Only the
workers' wait for the next command is unbounded (an idle engine sends none).

Objects (the driver's commands) travel pickled, as a length and a ``uint8``
tensor of bytes.
"""

from __future__ import annotations

import pickle
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

# Collectives inside a step wait this long for the slowest rank (ranks do the
# same work, so this only covers imbalance, never a whole step).
COLLECTIVE_TIMEOUT = timedelta(seconds=30)
# Joining the group and receiving the weights.
SETUP_TIMEOUT = timedelta(seconds=300)
# A worker's wait for the driver's next command: the engine may idle for days.
FOREVER = timedelta(days=365)

def create_store(host: str, port: int, world_size: int, is_driver: bool) -> dist.TCPStore:
    """The rendezvous store: hosted by the driver (``port`` 0 picks a free one), joined by workers."""
    return dist.TCPStore(host, port, world_size, is_master=is_driver, wait_for_workers=False,
                         timeout=SETUP_TIMEOUT)


def env_store() -> tuple[dist.Store, int, int]:
    """``(store, rank, world_size)`` from an ``env://`` rendezvous (torchrun)."""
    store, rank, world_size = next(dist.rendezvous("env://", timeout=SETUP_TIMEOUT))
    return store, rank, world_size


def _process_group(store: dist.Store, rank: int, world_size: int, host: str | None) -> dist.ProcessGroup:
    if host in ("127.0.0.1", "localhost"):
        try:     # bind the loopback interface explicitly: the host name may resolve elsewhere
            options = dist.ProcessGroupGloo._Options()
            options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            options._timeout = SETUP_TIMEOUT
            return dist.ProcessGroupGloo(store, rank, world_size, options)
        except (AttributeError, TypeError):
            pass
    # torch's own choice of interface (GLOO_SOCKET_IFNAME when set), as init_process_group does
    return dist.ProcessGroupGloo(store, rank, world_size, SETUP_TIMEOUT)


class TPGroup:
    """One rank's view of the tensor-parallel group (rank 0 is the driver)."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, host: str | None = None,
                 timeout: timedelta = COLLECTIVE_TIMEOUT) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.store = store
        self.pg = _process_group(dist.PrefixStore("pagedgen/tp", store), rank, world_size, host)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks (the row-parallel projections' partial outputs)."""
        if x.dtype == torch.bfloat16:          # sum in float32: one rounding, like the unsplit GEMM
            return self.all_reduce(x.float()).to(torch.bfloat16)
        x = x.contiguous()
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        opts.timeout = self.timeout
        self.pg.allreduce([x], opts).wait()
        return x

    def gather_to_driver(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank shards ``[N, C]`` -> ``[N, world_size * C]`` on the driver (None elsewhere)."""
        x = x.contiguous()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        opts.timeout = self.timeout
        if not self.is_driver:
            self.pg.gather([], [x], opts).wait()
            return None
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self.pg.gather([parts], [x], opts).wait()
        return torch.cat(parts, dim=1)

    def broadcast_object(self, obj=None, timeout: timedelta | None = None):
        """The driver's ``obj`` on every rank (pickled: a length, then the bytes)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.timeout = timeout or self.timeout
        if self.is_driver:
            payload = torch.from_numpy(np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL),
                                                     dtype=np.uint8).copy())
            size = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self.pg.broadcast([size], opts).wait()
        if not self.is_driver:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
            opts.timeout = self.timeout          # the bytes follow the length at once
        self.pg.broadcast([payload], opts).wait()
        return obj if self.is_driver else pickle.loads(payload.numpy().tobytes())

    def send_arrays(self, arrays: dict[str, np.ndarray], dst: int) -> None:
        """Send ``arrays`` (float32, in key order) to rank ``dst``."""
        for tag, name in enumerate(sorted(arrays)):
            t = torch.from_numpy(np.ascontiguousarray(arrays[name], dtype=np.float32))
            self.pg.send([t], dst, tag).wait(SETUP_TIMEOUT)

    def recv_arrays(self, shapes: dict[str, tuple[int, ...]], src: int = 0) -> dict[str, np.ndarray]:
        """Receive the arrays ``send_arrays`` sent, one per key of ``shapes``."""
        out = {}
        for tag, name in enumerate(sorted(shapes)):
            t = torch.empty(shapes[name], dtype=torch.float32)
            self.pg.recv([t], src, tag).wait(SETUP_TIMEOUT)
            out[name] = t.numpy()
        return out
