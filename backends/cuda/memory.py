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
  its graph objects, the latter counted once per graph to capture.
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


def kv_cache_bytes(profile: MemoryProfile, gpu_memory_utilization: float) -> int:
    """Bytes left for the KV cache under ``gpu_memory_utilization`` (0 when nothing is left)."""
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    budget = int(profile.total * gpu_memory_utilization)
    graphs = profile.graph_pool + profile.graph_overhead * profile.num_graphs
    return max(0, budget - profile.peak_torch - profile.non_torch - graphs)


def num_kv_blocks(memory_bytes: int, block_bytes: int) -> int:
    """Whole KV blocks of ``block_bytes`` that fit ``memory_bytes``."""
    if block_bytes < 1:
        raise ValueError(f"block_bytes must be >= 1, got {block_bytes}")
    return max(0, int(memory_bytes)) // block_bytes

