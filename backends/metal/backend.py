"""The metal backend: the Llama-family model in MLX over the paged KV cache.

On Apple Silicon MLX runs on the GPU (Metal); elsewhere on MLX's CPU build,
which is how CI tests it against the cpu backend. One ``execute`` call:

1. drops the state (seeded keys) of finished / preempted requests;
2. updates the persistent input batch (``backends.input_batch``: block-table
   rows kept across steps) and turns its int32 arrays into MLX arrays and the
   attention metadata, once for all layers;
3. builds the forward pass lazily and starts evaluating the logits and
   every layer's new K/V cache with ``mx.async_eval`` (no graph outlives the
   step, and the cache scatters reuse the cache buffers);
4. while the device runs the forward pass, builds the sampling plan on the
   host (penalty counts, grammar bitmasks) and appends the sampling stages to
   the graph (``MetalSampler``: token ids stay an MLX array); then one
   ``mx.eval`` waits for the step, the only host synchronisation of a step
   whose sampling has no top-p candidate growth.

Async scheduling (``submit``, ``supports_ahead``): ``submit`` does steps 1-4
but the wait, and returns a ``MetalPendingStep`` holding the step's tokens,
logprob statistics and keys as running MLX arrays (``MetalSampler.build``,
then ``mx.async_eval``); its ``result()`` is the step's one ``mx.eval``. The
engine lays out step t+1 while step t runs (``Scheduler.schedule_ahead``) and
submits it with step t's handle as ``previous``: the ahead step's input ids
are ``previous.tokens[rows]``, gathered on the device, so step t+1 is queued
behind step t before the host has seen step t's tokens, and the host
detokenizes and emits step t while the device runs step t+1. Steps that need
prompt logprobs run through ``execute``. Everything stays on the engine's
step thread (MLX streams are per thread).

Memory (``backends.metal.memory``): ``dtype="auto"`` is bfloat16; with no KV
cache size given the cache gets ``gpu_memory_utilization`` of Metal's
recommended working set after the weights; the wired and buffer-cache limits
are set once the cache is allocated and MLX's buffer cache is emptied every
``CLEAR_CACHE_EVERY`` steps.
"""

from __future__ import annotations

from functools import partial
from itertools import chain

import mlx.core as mx
import numpy as np
import structlog

from backends.base import (Backend, BackendOptions, CompletedStep, LogitRows, PendingStep, blocks_for_memory,
                           kv_block_bytes, run_step)
from backends.metal import memory
from backends.input_batch import InputBatch
from backends.metal.attention import KVCache, metadata_from_inputs
from backends.metal.model import MLXLlamaModel, mlx_dtype
from backends.metal.sampler import LazySample, MetalSampler
from model.config import ModelConfig
from scheduler.output import SchedulerOutput, StepResult

log = structlog.get_logger(__name__)


def _take_rows(logits: mx.array, rows: list[int]) -> mx.array:
    return logits[mx.array(np.asarray(rows, dtype=np.int32))]                                      # [R, V]


# How run_step reads the all-token logits (prompt logprobs).
MLX_LOGIT_ROWS = LogitRows(take=_take_rows,
                           to_numpy=lambda logits, rows: np.array(_take_rows(logits, rows).astype(mx.float32)))


class MetalPendingStep(PendingStep):
    """A metal step in flight: its sampled tokens still an MLX array the next step may read on the device."""

    def __init__(self, sampler: MetalSampler, lazy: LazySample, request_ids: list[str]) -> None:
        self.tokens = lazy.tokens                       # [N] int32, one per sampling request, in layout order
        self.row_of = {rid: i for i, rid in enumerate(request_ids)}   # request id -> its row of tokens
        self._sampler, self._lazy, self._request_ids = sampler, lazy, request_ids
        self._result: StepResult | None = None

    def result(self) -> StepResult:
        """Wait for the step (its one ``mx.eval``) and read its tokens and logprobs."""
        if self._result is None:
            token_ids, logprobs = self._sampler.finish(self._lazy)
            result = StepResult()
            for rid, token_id, lp in zip(self._request_ids, token_ids, logprobs):
                result.sampled_token_ids[rid] = token_id
                if lp is not None:
                    result.logprobs[rid] = lp
            self._result, self._lazy = result, None
        return self._result


class MetalBackend(Backend):
    """``Backend`` on MLX (see ``backends/base.py`` for the life cycle).

    ``dtype`` is the compute and KV cache dtype: ``bfloat16`` (``auto``) or
    ``float16`` on Apple GPUs, ``float32`` where asked (and for parity tests).
    ``gpu_memory_utilization``, ``max_num_batched_tokens`` and
    ``max_num_seqs`` size the KV cache (``profile_kv_cache_memory``). The
    engine's ``num_threads`` does not reach it (``create`` leaves it out):
    MLX sizes its own CPU pool.
    """

    name = "metal"
    supports_ahead = True

    def __init__(
        self,
        model_config: ModelConfig,
        weights: dict,
        dtype: str = "float32",
        seed: int = 0,
        eos_token_ids: tuple[int, ...] = (),
        gpu_memory_utilization: float = 0.9,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
    ) -> None:
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self._mx_dtype = mlx_dtype(dtype)
        self.dtype = dtype
        self.model_config = model_config
        self.device = str(mx.default_device())
        self.model = MLXLlamaModel(model_config, weights, self._mx_dtype)
        self.sampler = MetalSampler(eos_token_ids or model_config.eos_token_ids, seed=seed)
        self.kv_caches: list[KVCache] = []
        self.block_size = 0
        self.num_blocks = 0
        self.gpu_memory_utilization = gpu_memory_utilization
        self.weight_bytes = self.model.weight_bytes()     # packed weights at their packed size
        self.step_reserve = memory.step_reserve_bytes(model_config, max_num_batched_tokens, max_num_seqs,
                                                      self._mx_dtype.size)
        self.limits = memory.MemoryLimits()
        self.num_steps = 0
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.input_batch: InputBatch | None = None        # the persistent batch, made with the KV cache

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes one KV block costs across all layers (K and V)."""
        c = self.model_config
        return kv_block_bytes(c.num_hidden_layers, block_size, c.num_key_value_heads, c.head_dim, self._mx_dtype.size)

    def num_blocks_for_memory(self, memory_bytes: int, block_size: int) -> int:
        """How many KV blocks fit ``memory_bytes``."""
        return blocks_for_memory(memory_bytes, self.kv_block_bytes(block_size))

    def profile_kv_cache_memory(self, block_size: int) -> int | None:
        """KV cache bytes from Metal's recommended working set (``backends.metal.memory``); None off Metal."""
        working_set = memory.recommended_working_set()
        if working_set is None:
            return None
        return memory.kv_cache_budget(working_set, self.gpu_memory_utilization, mx.get_active_memory(),
                                      self.step_reserve, self.model_config.num_hidden_layers)

    def memory_stats(self) -> dict[str, int]:
        """MLX's ``active``, ``peak`` and ``cache`` bytes (``GetStats`` / metrics)."""
        return memory.memory_stats()

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """One zeroed ``[num_blocks, block_size, Hkv, D]`` K and V array per layer; then MLX's memory limits."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        c = self.model_config
        shape = (num_blocks, block_size, c.num_key_value_heads, c.head_dim)
        self.kv_caches = [(mx.zeros(shape, dtype=self._mx_dtype), mx.zeros(shape, dtype=self._mx_dtype))
                          for _ in range(c.num_hidden_layers)]
        mx.eval(self.kv_caches)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.input_batch = InputBatch(block_size, max_reqs=self.max_num_seqs, max_tokens=self.max_num_batched_tokens,
                                      index_dtype=np.int32)
        self.limits.apply(memory.recommended_working_set(), self.step_reserve)
        stats = memory.memory_stats()
        log.info("metal_memory", dtype=self.dtype, weights_mib=self.weight_bytes >> 20,
                 kv_cache_mib=(num_blocks * self.kv_block_bytes(block_size)) >> 20, active_mib=stats["active"] >> 20,
                 peak_mib=stats["peak"] >> 20, wired_limit_mib=_mib(self.limits.wired_limit),
                 cache_limit_mib=_mib(self.limits.cache_limit))

    def execute(self, scheduler_output: SchedulerOutput) -> StepResult:
        """Run one step: write new K/V, attend, sample where ``needs_sample`` (see the module docstring)."""
        result = run_step(scheduler_output, self.sampler.drop, partial(self.compute_logits, wait=False),
                          self.sampler.sample, MLX_LOGIT_ROWS)
        self._count_step()
        return result

    def submit(self, scheduler_output: SchedulerOutput, previous: PendingStep | None = None) -> PendingStep:
        """Start one step and return at once (see the module docstring); an ahead step
        (``scheduler_output.ahead``) takes its input ids from ``previous``'s tokens on the device."""
        scheduled = scheduler_output.scheduled
        input_ids = None
        if scheduler_output.ahead:
            if not isinstance(previous, MetalPendingStep):
                raise ValueError("an ahead step needs the previous step's MetalPendingStep as previous")
            missing = [r.request_id for r in scheduled if r.request_id not in previous.row_of]
            if missing or any(len(r.token_ids) != 1 for r in scheduled):
                raise ValueError(f"an ahead step has one token per request of the previous step; "
                                 f"{missing[:3] or 'some'} do not fit")
            src = np.fromiter((previous.row_of[r.request_id] for r in scheduled), np.int32, len(scheduled))
            input_ids = previous.tokens[mx.array(src)]                                    # [T] int32, lazy
        elif any(r.needs_prompt_logprobs for r in scheduled):
            return CompletedStep(self.execute(scheduler_output))
        self.sampler.drop(chain(scheduler_output.finished_request_ids, scheduler_output.preempted_request_ids))
        rows = [r for r in scheduled if r.needs_sample]
        if not rows:                                   # prefill chunks only (or nothing): no token to wait for
            if scheduled:
                self.compute_logits(scheduler_output, wait=False)
                self._count_step()
            return CompletedStep(StepResult())
        logits = self.compute_logits(scheduler_output, wait=None, input_ids=input_ids)      # [N, V] running
        lazy = self.sampler.start(logits, rows)
        mx.async_eval(lazy.tokens, lazy.stats, lazy.keys)
        self._count_step()
        return MetalPendingStep(self.sampler, lazy, [r.request_id for r in rows])

    def _count_step(self) -> None:
        self.num_steps += 1
        if self.num_steps % memory.CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()

    def compute_logits(self, scheduler_output: SchedulerOutput, all_tokens: bool = False,
                       wait: bool | None = True, input_ids: mx.array | None = None) -> mx.array:
        """Run the model over the step; float32 logits ``[N, V]`` of the requests that sample.

        Rows follow the order of ``scheduled`` among those with ``needs_sample``;
        with ``all_tokens`` every scheduled token gets its row (``[T, V]``).
        Writes the step's K/V into the cache like ``execute`` (which calls it).
        ``wait``: evaluated on return; False: the evaluation of the logits and
        the caches is started (``mx.async_eval``) and the logits come back
        still running; None: only the logits' evaluation is started (the caches
        are computed on the way), so that no reference to this step's caches
        outlives it and a step submitted behind it still scatters in place
        (``submit``: naming the caches in ``mx.async_eval`` keeps them
        referenced until it completes, and the next step's scatter copies).
        ``input_ids`` ``[T]`` int32: an ahead step's tokens, still on the device
        (the step's own ``token_ids`` are placeholders then).
        """
        if not self.kv_caches:
            raise RuntimeError("allocate_kv_cache must be called before execute")
        if scheduler_output.block_size != self.block_size:
            raise ValueError(f"step block_size {scheduler_output.block_size} != cache block_size {self.block_size}")
        step = self.input_batch.prepare(scheduler_output, all_tokens,   # buffers reused: mx.array copies them
                                        takes_ahead=input_ids is not None)
        if input_ids is None:
            input_ids = mx.array(step.token_ids)                                         # [T] int32
        positions = mx.array(step.positions)                                             # [T] int32
        logits_indices = mx.array(step.logits_indices)                                   # [N] (or [T]) int32
        metadata = metadata_from_inputs(step, self.block_size)
        caches, self.kv_caches = self.kv_caches, []      # the graph alone holds the old caches: scatter in place
        try:
            logits, caches = self.model.forward(input_ids, positions, caches, metadata, logits_indices)
            if wait is None:
                mx.async_eval(logits)
            else:
                (mx.eval if wait else mx.async_eval)(logits, caches)
        except BaseException:
            self.kv_caches = caches                      # keep a cache list; the engine fails this step's requests
            raise
        self.kv_caches = caches
        return logits

    def shutdown(self) -> None:
        """Release the KV cache and the weights; MLX's limits go back to what they were."""
        self.limits.restore()
        self.kv_caches = []
        self.model = None
        self.sampler.clear()
        mx.clear_cache()


def _mib(value: int | None) -> int | None:
    return None if value is None else value >> 20


def create(model_config: ModelConfig, weights: dict, options: BackendOptions) -> MetalBackend:
    """The registry's factory (``backends.registry``): ``dtype="auto"`` is ``memory.AUTO_DTYPE`` (bfloat16)."""
    return MetalBackend(model_config, weights, dtype=options.resolve_dtype(memory.AUTO_DTYPE), seed=options.seed,
                        eos_token_ids=options.eos_token_ids, gpu_memory_utilization=options.gpu_memory_utilization,
                        max_num_batched_tokens=options.max_num_batched_tokens, max_num_seqs=options.max_num_seqs)
