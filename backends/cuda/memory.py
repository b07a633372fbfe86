"""How much of the GPU the KV cache gets.

``gpu_memory_utilization`` is the fraction of the device's total memory this
process may use. What the KV cache gets is that budget minus, measured by a
profiling step before the cache exists:

- the peak torch memory of a worst-case step (weights + activations of
  ``max_num_batched_tokens`` tokens + logits and sampling of
  ``max_num_seqs`` rows), from ``torch.cuda.max_memory_allocated``;
- memory outside torch's allocator (CUDA context, cuBLAS workspaces,
  NCCL...), the device's used memory minus torch's reserved memory;
- CUDA-graph memory: a trial capture of the largest graph, its pool plus
  its graph objects, the latter counted once per graph to capture; and the
  outputs of the other graphs. A graph's output (a full graph's float32
  logits ``[B, vocab]``) stays allocated in the shared pool as long as the
  graph lives, so the pool holds one per captured size on top of the
  largest graph's working memory: about 1.1 GB for the 24 decode sizes up to
  256 of a 128k vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

from backends.base import kv_block_bytes  # noqa: F401 - the cuda backend sizes its cache with it


@dataclass(frozen=True)
class MemoryProfile:
    """Measured in bytes before the KV cache is allocated."""

    total: int                     # device memory
    peak_torch: int                # peak allocated by torch during the profiling step (weights included)
    non_torch: int                 # used by the process outside torch's allocator
    graph_pool: int = 0            # CUDA-graph pool of the largest graph (shared by all graphs)
    graph_overhead: int = 0        # per-graph memory outside the pool
    num_graphs: int = 0            # graphs that will be captured
    graph_outputs: int = 0         # outputs of the graphs besides the measured one, which stay in the pool

    def __post_init__(self) -> None:
        if min(self.total, self.peak_torch, self.non_torch, self.graph_pool, self.graph_overhead,
               self.num_graphs, self.graph_outputs) < 0:
            raise ValueError(f"memory figures must be >= 0: {self}")

    @property
    def graph_bytes(self) -> int:
        """Everything the CUDA graphs hold: pool, per-graph objects, the other graphs' outputs."""
        return self.graph_pool + self.graph_overhead * self.num_graphs + self.graph_outputs


def kv_cache_bytes(profile: MemoryProfile, gpu_memory_utilization: float) -> int:
    """Bytes left for the KV cache under ``gpu_memory_utilization`` (0 when nothing is left)."""
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    budget = int(profile.total * gpu_memory_utilization)
    return max(0, budget - profile.peak_torch - profile.non_torch - profile.graph_bytes)


def allocation_bytes(nbytes: int) -> int:
    """What torch's caching allocator sets aside for one ``nbytes`` tensor (512 B; 2 MiB from 1 MiB up)."""
    granule = 2 << 20 if nbytes >= 1 << 20 else 512
    return -(-nbytes // granule) * granule


def graph_output_bytes(sizes, measured_size: int, bytes_per_row: int) -> int:
    """Pool bytes held by the outputs of the graphs of ``sizes`` other than ``measured_size``.

    A graph of size ``B`` returns ``B`` rows of ``bytes_per_row``; the
    measured (largest) graph's output is already inside its pool figure.
    """
    if bytes_per_row < 0:
        raise ValueError(f"bytes_per_row must be >= 0, got {bytes_per_row}")
    return sum(allocation_bytes(size * bytes_per_row) for size in sizes if size != measured_size)


def num_kv_blocks(memory_bytes: int, block_bytes: int) -> int:
    """Whole KV blocks of ``block_bytes`` that fit ``memory_bytes``."""
    if block_bytes < 1:
        raise ValueError(f"block_bytes must be >= 1, got {block_bytes}")
    return max(0, int(memory_bytes)) // block_bytes

