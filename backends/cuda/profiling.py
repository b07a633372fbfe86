"""Measure what the GPU needs besides the KV cache (``backends.cuda.memory`` does the arithmetic).

``profile_memory`` runs, before any KV cache exists:

1. a worst-case step: ``max_num_batched_tokens`` prompt tokens spread over
   ``min(max_num_seqs, tokens)`` requests, over a one-block dummy cache with
   every cache write skipped (slot -1), logits for every request and a full
   sort of them (what top-p sampling may need);
2. the CUDA graphs: piecewise graphs do not read the cache, so they are
   captured for good here and measured exactly; full graphs read the cache,
   so the largest one is captured over the dummy cache, measured (pool and
   per-graph memory) and dropped, to be captured after the real cache. Its
   output (logits) gives the bytes per row that every other graph's output
   will keep in the pool (``memory.graph_output_bytes``).
"""

from __future__ import annotations

import numpy as np
import torch

from backends.cuda.memory import MemoryProfile, graph_output_bytes


def _used(device: torch.device) -> int:
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def profile_memory(backend, block_size: int) -> MemoryProfile:
    """The ``MemoryProfile`` of ``backend`` (a ``CUDABackend`` without KV cache yet)."""
    device = backend.device
    c = backend.model_config
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    dummy = torch.zeros((1, block_size, c.num_key_value_heads, c.head_dim), dtype=backend.model.dtype, device=device)
    dummy_caches = [(dummy, dummy)] * c.num_hidden_layers

    num_tokens = backend.max_num_batched_tokens
    num_requests = min(backend.max_num_seqs, num_tokens)
    query_lens = [num_tokens // num_requests + (i < num_tokens % num_requests) for i in range(num_requests)]
    tables = [[0] * -(-n // block_size) for n in query_lens]
    with torch.inference_mode():
        metadata = backend.attention.build_metadata(query_lens, [0] * num_requests, tables, [-1] * num_tokens, device)
        buf = backend.buffers.sized(num_tokens)
        buf.input_ids.zero_()
        buf.positions.copy_(torch.from_numpy(np.concatenate([np.arange(n) for n in query_lens])).to(device))
        last_rows = torch.as_tensor(np.cumsum(query_lens) - 1, device=device)
        logits = backend.model.forward(buf, dummy_caches, metadata, last_rows)            # [R, V]
        torch.sort(logits, dim=-1, descending=True)
        torch.softmax(logits.double(), dim=-1).cumsum_(dim=-1)
        del logits
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info(device)[1]
    non_torch = max(0, _used(device) - torch.cuda.memory_reserved(device))

    graph_pool = graph_overhead = num_graphs = graph_outputs = 0
    if backend.cuda_graph_mode == "piecewise":
        reserved0, used0 = torch.cuda.memory_reserved(device), _used(device)
        backend.capture()
        graph_pool = torch.cuda.memory_reserved(device) - reserved0
        graph_overhead = max(0, _used(device) - used0 - graph_pool)              # all graphs' objects together
        num_graphs = 1
        # already captured and resident: the peak below the budget must still hold them
    elif backend.cuda_graph_mode == "full":
        backend.block_size = block_size
        largest = max(backend.full_sizes)
        reserved0, used0 = torch.cuda.memory_reserved(device), _used(device)
        backend.capture_sizes([largest], lambda b: backend._capture_full(b, dummy_caches))
        graph_pool = torch.cuda.memory_reserved(device) - reserved0
        graph_overhead = max(0, _used(device) - used0 - graph_pool)
        num_graphs = len(backend.full_sizes)
        output = backend._full_graphs[largest].output                             # [B, V] float32 logits
        graph_outputs = graph_output_bytes(backend.full_sizes, largest,
                                           output.numel() * output.element_size() // largest)
        del output
        backend.release_graphs()
        backend._static = None
        backend.block_size = 0
    del dummy, dummy_caches
    torch.cuda.empty_cache()
    return MemoryProfile(total=total, peak_torch=peak, non_torch=non_torch, graph_pool=graph_pool,
                         graph_overhead=graph_overhead, num_graphs=num_graphs, graph_outputs=graph_outputs)
