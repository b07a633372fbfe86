"""The ``Backend`` protocol every device backend implements, and the registry.

The engine owns one backend. Its life:

1. constructed by ``create_backend(name, model_config, weights, ...)``;
2. asked ``kv_block_bytes(block_size)`` / ``num_blocks_for_memory(...)`` so the
   engine can size the scheduler's ``BlockPool``;
3. ``allocate_kv_cache(num_blocks, block_size)`` once;
4. ``execute(scheduler_output)`` once per step, on the engine's step thread;
   while idle, the engine calls ``check_health()`` where a backend has it
   (optional: a backend with worker processes raises there when one died);
5. ``shutdown()``.

Backends are picked through lazy-import factories, so a device framework
(triton, mlx) is imported only when its backend is selected.
"""

from __future__ import annotations

import importlib
import platform
from itertools import chain
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np

from engine.model_config import ModelConfig
from scheduler.output import SchedulerOutput, StepResult


@runtime_checkable
class Backend(Protocol):
    name: str        # "cpu", "cuda", "metal"
    dtype: str       # "float32", "bfloat16", "float16"

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes one KV block costs across all layers (K and V)."""

    def num_blocks_for_memory(self, memory_bytes: int, block_size: int) -> int:
        """How many KV blocks fit ``memory_bytes``."""

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Allocate the paged KV cache; called once before the first step."""

    def execute(self, scheduler_output: SchedulerOutput) -> StepResult:
        """Run one step: write new K/V, attend, sample where ``needs_sample``.

        Drops per-request state of ``finished_request_ids`` and
        ``preempted_request_ids`` first. Raises on a device failure; the
        engine then fails the requests of this step.
        """

    def shutdown(self) -> None:
        """Release device memory and worker threads."""


class StepRequest(NamedTuple):
    """One scheduled request's place in a step's flattened token batch."""

    start: int                   # first row of its new tokens
    query_len: int               # new tokens
    num_computed: int            # tokens already in the cache
    context_len: int             # num_computed + query_len
    num_blocks: int              # blocks its context spans
    table: Sequence[int]         # its block table (at least num_blocks entries)


def step_requests(query_lens: Sequence[int], num_computed_tokens: Sequence[int],
                  block_tables: Sequence[Sequence[int]], slot_mapping: Sequence[int],
                  block_size: int) -> Iterator[StepRequest]:
    """Check a step's per-request lists (in token order) and walk its requests.

    What every backend's attention-metadata builder starts from; raises
    ``ValueError`` on lists that disagree.
    """
    if not len(query_lens) == len(num_computed_tokens) == len(block_tables):
        raise ValueError("query_lens, num_computed_tokens and block_tables must have one entry per request")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    num_tokens = int(sum(query_lens))
    if len(slot_mapping) != num_tokens:
        raise ValueError(f"slot_mapping has {len(slot_mapping)} entries for {num_tokens} tokens")
    start = 0
    for q_len, num_computed, table in zip(query_lens, num_computed_tokens, block_tables):
        if q_len < 1:
            raise ValueError("every scheduled request needs at least one new token")
        context_len = num_computed + q_len
        num_blocks = -(-context_len // block_size)
        if len(table) < num_blocks:
            raise ValueError(f"block table of {len(table)} blocks cannot hold {context_len} tokens")
        yield StepRequest(start, q_len, num_computed, context_len, num_blocks, table)
        start += q_len


def kv_block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, element_size: int) -> int:
    """Bytes one KV block costs: K and V of ``block_size`` tokens in every layer."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size


def blocks_for_memory(memory_bytes: int, block_bytes: int) -> int:
    """Whole KV blocks of ``block_bytes`` that fit ``memory_bytes`` (>= 0)."""
    if memory_bytes < 0:
        raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
    return int(memory_bytes) // block_bytes


def run_step(scheduler_output: SchedulerOutput, drop: Callable[[Iterable[str]], None],
             compute_logits: Callable[[SchedulerOutput], Any],
             sample: Callable[[Any, list], tuple[Sequence[int], Sequence[Any]]]) -> StepResult:
    """The ``execute`` every device backend shares.

    ``drop`` forgets the sampler state of finished and preempted requests;
    ``compute_logits`` runs the model (logits of the requests with
    ``needs_sample``, in ``scheduled`` order); ``sample(logits, rows)``
    returns their token ids and logprobs (None where not asked).
    """
    drop(chain(scheduler_output.finished_request_ids, scheduler_output.preempted_request_ids))
    result = StepResult()
    if scheduler_output.is_empty:
        return result
    logits = compute_logits(scheduler_output)                                        # [N, V]
    rows = [r for r in scheduler_output.scheduled if r.needs_sample]
    if not rows:
        return result
    token_ids, logprobs = sample(logits, rows)
    for request, token_id, lp in zip(rows, token_ids, logprobs):
        result.sampled_token_ids[request.request_id] = token_id
        if lp is not None:
            result.logprobs[request.request_id] = lp
    return result


# name -> "module:factory"; the factory takes (model_config, weights, **options).
_REGISTRY = {
    "cpu": "backends.cpu.backend:CPUBackend",
    "cuda": "backends.cuda.backend:CUDABackend",
    "metal": "backends.metal.backend:MetalBackend",
}

BACKEND_NAMES = ("auto", *_REGISTRY)


def resolve_backend_name(name: str) -> str:
    """Map ``auto`` to the best backend available on this machine."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}, got {name!r}")
    if name != "auto":
        return name
    try:
        import torch

        if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
            if importlib.util.find_spec("backends.cuda.backend") is not None:
                return "cuda"
    except ImportError:
        pass
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        if importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("backends.metal.backend"):
            return "metal"
    return "cpu"


def create_backend(name: str, model_config: ModelConfig, weights: dict[str, np.ndarray],
                   tensor_parallel_size: int = 1, **options) -> Backend:
    """Import and construct the backend ``name`` (after ``resolve_backend_name``).

    With ``tensor_parallel_size`` > 1 the model is split over that many ranks
    of device ``name`` (``backends.tp.executor.TPBackend``).
    """
    if tensor_parallel_size != 1:
        from backends.tp.executor import TPBackend

        return TPBackend(model_config, weights, tensor_parallel_size=tensor_parallel_size, device=name, **options)
    target = _REGISTRY.get(name)
    if target is None:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}, got {name!r}")
    module_name, factory = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"backend {name!r} is not available here: {e}") from e
    return getattr(module, factory)(model_config, weights, **options)
