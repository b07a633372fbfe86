"""The ``Backend`` interface every device backend implements, its options, and the shared step helpers.

The engine owns one backend. Its life:

1. constructed by ``backends.registry.create_backend(name, model_config,
   weights, options)``, which imports the backend's module and calls its
   factory, ``create(model_config, weights, options)``;
2. asked ``profile_kv_cache_memory(block_size)`` when no KV cache size is
   given (``None``, the default: the engine's own default size), then
   ``kv_block_bytes(block_size)`` / ``num_blocks_for_memory(...)`` so the
   engine can size the scheduler's ``BlockPool``;
3. ``allocate_kv_cache(num_blocks, block_size)`` once;
4. ``execute(scheduler_output)`` once per step, on the engine's step thread,
   or, with async scheduling, ``submit(scheduler_output, previous)`` and the
   handle's ``result()`` (the default runs ``execute`` at once); while idle,
   the engine calls ``check_health()`` (a backend with worker processes
   raises there when one died; the default is always healthy);
5. ``shutdown()``.

The step helpers below (``step_requests``, ``kv_block_bytes``,
``blocks_for_memory``, ``run_step``) are what the backends share of steps 2-4.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from scheduler.output import Logprobs, SchedulerOutput, StepResult

AUTO_DTYPE = "auto"                           # let the backend pick its dtype
DTYPES = ("float32", "bfloat16", "float16")   # the compute and KV cache dtypes a backend may run in


@dataclass(frozen=True)
class BackendOptions:
    """What the engine tells whichever backend it creates: one neutral object.

    One object for every backend, rather than a type per backend, because the
    engine builds it from ``EngineArgs`` before it knows which backend reads
    it: it never names a backend. Each backend's factory,
    ``create(model_config, weights, options)`` in its module, picks the
    fields it uses and ignores the others (the cpu backend reads no
    ``cuda_graph_mode``), and resolves ``dtype="auto"`` to its own choice. A
    new backend option is a field here plus the factory that reads it.
    """

    dtype: str = AUTO_DTYPE                  # compute and KV cache dtype, or "auto": the backend's choice
    seed: int = 0                            # seed of unseeded sampling
    num_threads: int | None = None           # cpu: torch threads (None: all cores); tensor parallel: split over ranks
    eos_token_ids: tuple[int, ...] = ()      # the tokenizer's end-of-sequence ids; (): the model config's
    max_num_seqs: int = 256                  # cuda: the largest decode batch (graph sizes, step buffers)
    max_num_batched_tokens: int = 2048       # cuda: the most tokens in one step (step buffers, piecewise graphs)
    max_model_len: int | None = None         # cuda: the context limit the engine enforces; None: the model's
    gpu_memory_utilization: float = 0.9      # cuda, metal: share of GPU memory the engine may use (KV cache sized from it)
    cuda_graph_mode: str = "full"            # cuda: none | piecewise | full
    tensor_parallel_size: int = 1            # ranks the model is split over; > 1 picks the device's TP backend

    def __post_init__(self) -> None:
        if self.dtype not in (AUTO_DTYPE, *DTYPES):
            raise ValueError(f"dtype must be one of {', '.join((AUTO_DTYPE, *DTYPES))}, got {self.dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("num_threads", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.eos_token_ids, tuple) or not all(isinstance(t, int) for t in self.eos_token_ids):
            raise ValueError(f"eos_token_ids must be a tuple of token ids, got {self.eos_token_ids!r}")

    def resolve_dtype(self, auto: str) -> str:
        """``dtype``, or ``auto`` (the calling backend's choice) where it is "auto"."""
        return auto if self.dtype == AUTO_DTYPE else self.dtype


class Backend(ABC):
    """One device's model runner behind the engine (see the module docstring for its life).

    Backends inherit from it: the abstract methods are what every backend
    implements; the others are optional, with the defaults a backend without
    them needs, so the engine calls every member without probing for it.
    """

    name: str        # "cpu", "cuda", "metal"
    dtype: str       # the resolved compute and KV cache dtype: "float32", "bfloat16", "float16" (never "auto")

    @abstractmethod
    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes one KV block costs across all layers (K and V)."""

    @abstractmethod
    def num_blocks_for_memory(self, memory_bytes: int, block_size: int) -> int:
        """How many KV blocks fit ``memory_bytes``."""

    @abstractmethod
    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Allocate the paged KV cache; called once before the first step."""

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> StepResult:
        """Run one step: write new K/V, attend, sample where ``needs_sample``.

        Drops per-request state of ``finished_request_ids`` and
        ``preempted_request_ids`` first. Raises on a device failure; the
        engine then fails the requests of this step.
        """

    @abstractmethod
    def shutdown(self) -> None:
        """Release device memory and worker threads."""

    # The backend takes an ahead step (``SchedulerOutput.ahead``): its input tokens from ``submit``'s
    # ``previous`` on the device. False: the engine steps synchronously (``execute``) whatever its flag.
    supports_ahead: bool = False

    def submit(self, scheduler_output: SchedulerOutput, previous: PendingStep | None = None) -> PendingStep:
        """Start one step; its result comes from the returned handle.

        ``previous``: the handle of the step still in flight before this one,
        given with an ahead step (``scheduler_output.ahead``), whose every
        row's input token is the one ``previous`` samples for it. The default
        runs ``execute`` now and takes no ahead step; a backend with
        ``supports_ahead`` starts the step on the device and returns at once.
        """
        if scheduler_output.ahead:
            raise ValueError(f"the {self.name} backend cannot take an ahead step (supports_ahead is False): "
                             "schedule it synchronously")
        return CompletedStep(self.execute(scheduler_output))

    def profile_kv_cache_memory(self, block_size: int) -> int | None:
        """Bytes this backend gives the KV cache when the user named no size; None: the engine's default.

        Called once, after construction and before ``allocate_kv_cache``,
        only when neither a KV cache size nor a block count was given. The
        default is None; the cuda backend profiles a worst-case step here.
        """
        return None

    def memory_stats(self) -> dict[str, int]:
        """The device allocator's counters in bytes: ``active`` (held now) and ``peak`` (since start).

        Read by the engine's ``get_stats`` (``GetStats``, the metrics); the
        default reports none (``{}``: the stats show 0).
        """
        return {}

    def check_health(self) -> None:
        """Raise (an ``EngineDeadError``) when this backend can no longer serve.

        Called by the engine between steps while idle. The default is always
        healthy; a backend with worker processes raises when one died.
        """


class PendingStep(ABC):
    """A submitted step (``Backend.submit``): ``result()`` waits for it, once per step.

    A backend with ``supports_ahead`` keeps what the device computes (the
    sampled tokens) in its handle, so that the next step can take its input
    tokens from it without the host seeing them first.
    """

    @abstractmethod
    def result(self) -> StepResult:
        """The step's ``StepResult`` (waits for the device on the first call; later calls return it again).
        Raises what the step raised."""


class CompletedStep(PendingStep):
    """A step that already ran (``Backend.submit``'s default)."""

    def __init__(self, result: StepResult) -> None:
        self._result = result

    def result(self) -> StepResult:
        return self._result


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


class LogitRows(NamedTuple):
    """How ``run_step`` reads rows of a backend's all-token logits (for prompt logprobs)."""

    take: Callable[[Any, list[int]], Any]              # (logits [T, V], rows) -> logits [R, V] in the backend's array type
    to_numpy: Callable[[Any, list[int]], np.ndarray]   # (logits [T, V], rows) -> float32 numpy [R, V]


def prompt_logprobs(logits: np.ndarray, target_ids: Sequence[int], k: int) -> list[Logprobs]:
    """Logprob and rank of ``target_ids[i]`` under row ``i`` of ``logits`` ``[R, V]``, and the top ``k``."""
    shifted = logits - logits.max(axis=-1, keepdims=True)                          # [R, V]
    lps = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))            # [R, V]
    rows = np.arange(len(target_ids))
    chosen = lps[rows, np.asarray(target_ids, dtype=np.int64)]                     # [R]
    ranks = (lps > chosen[:, None]).sum(axis=-1) + 1                               # [R]
    top = np.zeros((len(rows), 0), dtype=np.int64)
    if k:
        top = np.argpartition(-lps, k - 1, axis=-1)[:, :k]                         # [R, k], unordered
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(lps, top, -1), axis=-1, kind="stable"), -1)
    return [Logprobs(token_id=int(t), logprob=float(chosen[i]), rank=int(ranks[i]),
                     top=[(int(j), float(lps[i, j])) for j in top[i]])
            for i, t in enumerate(target_ids)]


def run_step(scheduler_output: SchedulerOutput, drop: Callable[[Iterable[str]], None],
             compute_logits: Callable[..., Any],
             sample: Callable[[Any, list], tuple[Sequence[int], Sequence[Any]]],
             logit_rows: LogitRows | None = None) -> StepResult:
    """The ``execute`` every device backend shares.

    ``drop`` forgets the sampler state of finished and preempted requests;
    ``compute_logits`` runs the model (logits of the requests with
    ``needs_sample``, in ``scheduled`` order; with ``all_tokens=True`` one
    row per scheduled token); ``sample(logits, rows)`` returns their token
    ids and logprobs (None where not asked). When a request needs prompt
    logprobs (``ScheduledRequest.needs_prompt_logprobs``) the step computes
    every token's logits, scores the prompt tokens its chunk predicts through
    ``logit_rows`` and samples from the sampling rows among them; a backend
    without ``logit_rows`` cannot serve such a request and fails the step.
    """
    drop(chain(scheduler_output.finished_request_ids, scheduler_output.preempted_request_ids))
    result = StepResult()
    if scheduler_output.is_empty:
        return result
    scheduled = scheduler_output.scheduled
    if any(r.needs_prompt_logprobs for r in scheduled):
        if logit_rows is None:
            raise NotImplementedError("this backend does not compute prompt logprobs")
        all_logits = compute_logits(scheduler_output, all_tokens=True)                 # [T, V]
        _score_prompts(scheduled, all_logits, logit_rows, result)
        ends = np.cumsum([len(r.token_ids) for r in scheduled])
        logits = logit_rows.take(all_logits, [int(ends[i]) - 1 for i, r in enumerate(scheduled) if r.needs_sample])
    else:
        logits = compute_logits(scheduler_output)                                    # [N, V]
    rows = [r for r in scheduled if r.needs_sample]
    if not rows:
        return result
    token_ids, logprobs = sample(logits, rows)
    for request, token_id, lp in zip(rows, token_ids, logprobs):
        result.sampled_token_ids[request.request_id] = token_id
        if lp is not None:
            result.logprobs[request.request_id] = lp
    return result


def _score_prompts(scheduled, all_logits: Any, logit_rows: LogitRows, result: StepResult) -> None:
    """``result.prompt_logprobs`` of the requests that need them: the row of
    position ``p`` scores prompt token ``p + 1``."""
    start = 0
    for r in scheduled:
        if r.needs_prompt_logprobs:
            num_prompt = len(r.prompt_token_ids)
            n = max(0, min(len(r.token_ids), num_prompt - 1 - r.num_computed_tokens))   # positions with a next prompt token
            targets = r.prompt_token_ids[r.num_computed_tokens + 1: r.num_computed_tokens + 1 + n]
            rows = list(range(start, start + n))
            result.prompt_logprobs[r.request_id] = (
                prompt_logprobs(logit_rows.to_numpy(all_logits, rows), targets, r.num_prompt_logprobs) if n else [])
        start += len(r.token_ids)
