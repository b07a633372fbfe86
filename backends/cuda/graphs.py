"""CUDA graphs: which sizes are captured, which graph a step replays, capture and replay.

Modes (``cuda_graph_mode``):

- ``none``: every step runs eagerly;
- ``piecewise``: the ``num_layers + 1`` pieces of the model (everything but
  attention, see ``backends.cuda.model``) are captured per padded token
  count; attention and the logits run eagerly, so prefill, chunked prefill
  and mixed steps up to the largest size benefit too;
- ``full``: whole decode steps (every request has one new token) are
  captured per padded batch size, attention included, with static metadata
  buffers; other steps run eagerly.

All graphs of a backend share one memory pool and are captured largest
first, so smaller graphs reuse the largest one's intermediate memory; what a
graph returns stays allocated in the pool for its lifetime (profiling counts
it, ``backends.cuda.profiling``). Capture calls ``capture_begin`` /
``capture_end`` directly: ``torch.cuda.graph`` would synchronise and empty
the allocator's cache for each of the ~800 piecewise graphs of an 8B model;
``capture_graphs`` collects garbage and releases cached memory once, before
the first. The
step's real rows are the first rows of the padded batch; padding rows
compute garbage that nothing reads (their cache slot is -1, their context
length 0).

On a CPU device (tests under ``TRITON_INTERPRET=1``) ``EagerGraph`` stands in
for ``CapturedGraph``: its replay re-runs the recorded function over the same
static buffers, so dispatch, padding and the filling of static inputs are
tested without a GPU; only the capture itself needs one.
"""

from __future__ import annotations

import bisect
import gc
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

CUDA_GRAPH_MODES = ("none", "piecewise", "full")
MAX_PIECEWISE_TOKENS = 512       # piecewise graphs cover steps of up to this many tokens


def graph_batch_sizes(max_size: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16, up to the first size that holds ``max_size``."""
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    sizes = []
    for size in (1, 2, 4, 8):
        sizes.append(size)
        if size >= max_size:
            return sizes
    size = 16
    while True:
        sizes.append(size)
        if size >= max_size:
            return sizes
        size += 16


def piecewise_token_sizes(max_num_seqs: int, max_num_batched_tokens: int,
                          max_tokens: int = MAX_PIECEWISE_TOKENS) -> list[int]:
    """Token counts captured in piecewise mode.

    The decode batch sizes up to 256 (``graph_batch_sizes``), then steps of 64,
    up to ``max(max_tokens, max_num_seqs)``, never above ``max_num_batched_tokens``.
    """
    limit = min(max_num_batched_tokens, max(max_tokens, max_num_seqs))
    sizes = [s for s in graph_batch_sizes(min(limit, 256)) if s <= limit]
    sizes += list(range(256 + 64, limit + 1, 64))
    if sizes[-1] < limit:
        sizes.append(limit)
    return sizes


def padded_size(n: int, sizes: Sequence[int]) -> int | None:
    """The smallest of the sorted ``sizes`` that holds ``n``; None when none does."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


@dataclass(frozen=True)
class GraphChoice:
    """How one step runs."""

    kind: str                      # "full", "piecewise" or "eager"
    size: int                      # padded batch (full) or token count (piecewise); real count when eager


class GraphDispatcher:
    """Picks the graph of a step from its shape (pure logic, no GPU)."""

    def __init__(self, mode: str, full_sizes: Sequence[int] = (), piecewise_sizes: Sequence[int] = ()) -> None:
        if mode not in CUDA_GRAPH_MODES:
            raise ValueError(f"cuda_graph_mode must be one of {', '.join(CUDA_GRAPH_MODES)}, got {mode!r}")
        self.mode = mode
        self.full_sizes = sorted(full_sizes) if mode == "full" else []
        self.piecewise_sizes = sorted(piecewise_sizes) if mode == "piecewise" else []

    def choose(self, num_tokens: int, num_requests: int, is_decode_only: bool) -> GraphChoice:
        """``full``: a decode step whose batch fits a graph; ``piecewise``: a step whose tokens fit; else eager."""
        if self.mode == "full" and is_decode_only:
            size = padded_size(num_requests, self.full_sizes)
            if size is not None:
                return GraphChoice("full", size)
        if self.mode == "piecewise":
            size = padded_size(num_tokens, self.piecewise_sizes)
            if size is not None:
                return GraphChoice("piecewise", size)
        return GraphChoice("eager", num_tokens)


@dataclass
class CaptureStats:
    """What capturing cost, for the log and the GPU check."""

    num_graphs: int = 0
    seconds: float = 0.0
    memory_bytes: int = 0                    # device memory taken (pool + graph objects)
    per_size_seconds: dict[int, float] | None = None


def capture_graphs(sizes: Sequence[int], capture_one: Callable[[int], None], synchronize: Callable[[], None],
                   used_memory: Callable[[], int], release_cached: Callable[[], None] | None = None) -> CaptureStats:
    """Call ``capture_one(size)`` largest size first, timing each; returns the totals.

    Before the first capture, once: a garbage collection and
    ``release_cached()`` (e.g. ``torch.cuda.empty_cache``), so the pool
    starts from what is really free; never once per graph.
    """
    stats = CaptureStats(per_size_seconds={})
    synchronize()
    gc.collect()
    if release_cached is not None:
        release_cached()
    before = used_memory()
    t_all = time.perf_counter()
    for size in sorted(sizes, reverse=True):
        t0 = time.perf_counter()
        capture_one(size)
        synchronize()
        stats.per_size_seconds[size] = time.perf_counter() - t0
        stats.num_graphs += 1
    stats.seconds = time.perf_counter() - t_all
    stats.memory_bytes = max(0, used_memory() - before)
    return stats


class CapturedGraph:
    """A CUDA graph of ``fn`` in ``pool``; ``replay()`` reruns it and returns its (static) output.

    ``fn`` runs once eagerly on a side stream first (cuBLAS picks its
    kernels, any Triton variant not compiled yet compiles), then is captured
    on that stream, without the per-graph synchronisation, garbage collection
    and cache release of ``torch.cuda.graph``.
    """

    def __init__(self, fn: Callable[[], torch.Tensor | None], pool, device: torch.device) -> None:
        current = torch.cuda.current_stream(device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(current)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            fn()                                                   # warm-up, outside the graph
            self.graph.capture_begin(pool=pool)
            try:
                self.output = fn()
            finally:
                self.graph.capture_end()
        current.wait_stream(stream)

    def replay(self) -> torch.Tensor | None:
        self.graph.replay()
        return self.output


class EagerGraph:
    """``CapturedGraph``'s stand-in on CPU: replay runs ``fn`` again on the same buffers."""

    def __init__(self, fn: Callable[[], torch.Tensor | None], pool=None, device=None) -> None:
        self.fn = fn

    def replay(self) -> torch.Tensor | None:
        return self.fn()
