"""The cpu backend: the shared torch model with gather-based paged attention.

It is both the reference every device backend is tested against and the
default on machines without a GPU. One ``execute`` call:

1. drops the state (seeded generators) of finished / preempted requests;
2. updates its persistent input batch (``backends.input_batch``: block-table
   rows change only where a request gained a block or joined) and builds the
   int64 step tensors and the attention metadata from it, once for all layers;
3. runs the model under ``torch.inference_mode`` (logits only for the rows
   that sample); float32 products go through ``backends.cpu.linear``: the
   native GEMMs up to ``NATIVE_GEMM_MAX_ROWS`` rows (decode steps), BLAS for
   prefill chunks (or, opt-in with ``PAGEDGEN_CPU_ONEDNN=1``, weights
   prepacked for oneDNN at load);
4. samples the requests with ``needs_sample``.
"""

from __future__ import annotations

import os
from functools import partial

import numpy as np
import structlog
import torch

from backends.cpu.attention import CPUAttention
from backends.cpu.linear import (  # noqa: F401  (re-exported: tests and callers import them from here)
    CONTIGUOUS_MIN_ROWS, LINEAR_ROW_BLOCK, NATIVE_GEMM_MAX_ROWS, NATIVE_MAX_ROWS, PROJECTIONS, OneDNNLinear,
    choose_contiguous_min_rows, choose_native_max_rows, cpu_linear, onednn_available, onednn_enabled, projections)
from backends.input_batch import InputBatch
from backends.cpu.native import decode_ops
from backends.sampler import Sampler
from backends.torch_model.model import LlamaModel
from backends.torch_model.weights import torch_dtype
from model.config import ModelConfig
from backends.base import Backend, BackendOptions, LogitRows, blocks_for_memory, kv_block_bytes, run_step
from scheduler.output import SchedulerOutput, StepResult

log = structlog.get_logger(__name__)

# Models whose projections hold fewer bytes than this skip the start-up GEMM measurements (they sit in cache).
TUNE_MIN_BYTES = 64 << 20


def available_cores() -> int:
    """CPU cores this process may run on (affinity-aware where the OS says)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# What dtype="auto" means on a CPU (and for the tensor-parallel ranks, which run this backend's model).
DEFAULT_DTYPE = "float32"
# Without native bfloat16, products of this many rows or more run in float32.
BF16_UPCAST_MIN_ROWS = 4


def _take_rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return logits[torch.as_tensor(rows, dtype=torch.int64, device=logits.device)]                  # [R, V]


# How run_step reads a torch backend's all-token logits (prompt logprobs); the cuda backend uses it too.
TORCH_LOGIT_ROWS = LogitRows(take=_take_rows,
                             to_numpy=lambda logits, rows: _take_rows(logits, rows).float().cpu().numpy())


def has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX)."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


class CPUBackend(Backend):
    """``Backend`` on any CPU (see ``backends/base.py`` for the life cycle)."""

    name = "cpu"

    def __init__(
        self,
        model_config: ModelConfig,
        weights: dict[str, np.ndarray],
        dtype: str = "float32",
        seed: int = 0,
        num_threads: int | None = None,
        eos_token_ids: tuple[int, ...] = (),
        onednn: bool | None = None,
    ) -> None:
        self._torch_dtype = torch_dtype(dtype)
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}")
        self.dtype = dtype
        self.model_config = model_config
        self.num_threads = num_threads or available_cores()
        torch.set_num_threads(self.num_threads)     # process-wide: torch has no per-object setting
        self.attention = CPUAttention(model_config.num_attention_heads, model_config.num_key_value_heads,
                                      model_config.head_dim, dtype=self._torch_dtype)
        linear = cpu_linear
        if self._torch_dtype == torch.bfloat16 and not has_native_bf16():
            linear = partial(cpu_linear, upcast_min_rows=BF16_UPCAST_MIN_ROWS)
        self.onednn = self._onednn_linear(onednn)
        self.model = LlamaModel(model_config, weights, self.attention, self._torch_dtype,
                                linear=linear if self.onednn is None else self.onednn,
                                ops=decode_ops() if self._torch_dtype == torch.float32 else None)
        if self.onednn is not None:
            self.onednn.pack(projections(self.model.weights))     # once; the plain weights stay for <= 8 rows
        elif self.model.ops is not None:
            self.model.fused_max_rows = NATIVE_GEMM_MAX_ROWS      # the layer calls' GEMMs are the native ones
        self._tune_for_this_machine()
        native = decode_ops()                                     # its argmax: logits are float32 in every dtype
        self.sampler = Sampler(eos_token_ids or model_config.eos_token_ids, seed=seed,
                               argmax=None if native is None else native.argmax)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = 0
        self.num_blocks = 0
        self.input_batch: InputBatch | None = None        # made with the KV cache (it needs the block size)

    def _tune_for_this_machine(self) -> None:
        """Measure, on this model's own weights, the GEMM choices that depend on the CPU and its memory
        system: whether the native GEMM prefetches the weights, from how many rows ``cpu_linear`` uses
        ``F.linear``, and up to how many it uses the native GEMMs (the first third of the layers, at 64
        rows). float32, models of 64 MiB or more: a toy model's weights sit in cache and say nothing. No
        choice changes a result beyond float rounding order. ~0.5 s for the default model."""
        weights = projections(self.model.weights)
        if self._torch_dtype != torch.float32 or sum(w.numel() * w.element_size() for w in weights) < TUNE_MIN_BYTES:
            return
        if self.model.ops is not None:
            log.info("cpu_gemm_prefetch", **self.model.ops.choose_weight_prefetch(weights))
        if self.onednn is None:
            first = self.model.weights.layers[0]
            rows, rates = choose_contiguous_min_rows([w for w in (getattr(first, name, None) for name in PROJECTIONS)
                                                      if isinstance(w, torch.Tensor)])
            log.info("cpu_linear_orientation", contiguous_min_rows=rows, **rates)
            third = self.model.weights.layers[: max(1, len(self.model.weights.layers) // 3)]
            native_rows, native_rates = choose_native_max_rows(
                [w for layer in third for w in (getattr(layer, name, None) for name in PROJECTIONS)
                 if isinstance(w, torch.Tensor)], rows, passes=2)
            log.info("cpu_native_gemm", native_max_rows=native_rows, **native_rates)
            self.model.linear = partial(cpu_linear, contiguous_min_rows=rows, native_max_rows=native_rows)
            if self.model.ops is not None:
                self.model.fused_max_rows = native_rows

    def _onednn_linear(self, requested: bool | None) -> OneDNNLinear | None:
        """The prepacked oneDNN linear where it applies (float32, oneDNN present, not switched off), else None.

        ``requested``: True insists (a clear error where it cannot be had),
        False declines, None follows ``PAGEDGEN_CPU_ONEDNN``.
        """
        if requested is False or (requested is None and not onednn_enabled()):
            return None
        if self._torch_dtype != torch.float32 or not onednn_available():
            if requested:
                raise ValueError("onednn=True needs dtype float32 and a torch with oneDNN on this CPU "
                                 f"(dtype {self.dtype}, oneDNN available: {onednn_available()}); "
                                 "pass onednn=None or False")
            return None
        return OneDNNLinear(cpu_linear)

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes one KV block costs across all layers (K and V)."""
        c = self.model_config
        return kv_block_bytes(c.num_hidden_layers, block_size, c.num_key_value_heads, c.head_dim,
                              torch.empty((), dtype=self._torch_dtype).element_size())

    def num_blocks_for_memory(self, memory_bytes: int, block_size: int) -> int:
        """How many KV blocks fit ``memory_bytes``."""
        return blocks_for_memory(memory_bytes, self.kv_block_bytes(block_size))

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """One zeroed ``[num_blocks, block_size, Hkv, D]`` K and V tensor per layer."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        c = self.model_config
        shape = (num_blocks, block_size, c.num_key_value_heads, c.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=self._torch_dtype), torch.zeros(shape, dtype=self._torch_dtype))
            for _ in range(c.num_hidden_layers)
        ]
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.input_batch = InputBatch(block_size)         # the step inputs, kept across steps

    def execute(self, scheduler_output: SchedulerOutput) -> StepResult:
        """Run one step: write new K/V, attend, sample where ``needs_sample``."""
        return run_step(scheduler_output, self.sampler.drop, self.compute_logits, self.sampler.sample_rows,
                        TORCH_LOGIT_ROWS)

    def compute_logits(self, scheduler_output: SchedulerOutput, all_tokens: bool = False) -> torch.Tensor:
        """Run the model over the step; float32 logits ``[N, V]`` of the requests that sample.

        Rows follow the order of ``scheduled`` among those with ``needs_sample``;
        with ``all_tokens`` every scheduled token gets its row (``[T, V]``, for
        prompt logprobs and tests). Writes the step's K/V into the cache like
        ``execute`` (which calls it).
        """
        if not self.kv_caches:
            raise RuntimeError("allocate_kv_cache must be called before execute")
        if scheduler_output.block_size != self.block_size:
            raise ValueError(f"step block_size {scheduler_output.block_size} != cache block_size {self.block_size}")
        step = self.input_batch.prepare(scheduler_output, all_tokens)      # persistent rows, numpy step arrays
        metadata = self.attention.metadata_from_inputs(step, self.block_size)
        with torch.inference_mode():
            return self.model.forward(torch.from_numpy(step.token_ids), torch.from_numpy(step.positions),
                                      self.kv_caches, metadata, torch.from_numpy(step.logits_indices))  # [N, V]

    def shutdown(self) -> None:
        """Release the KV cache and the weights."""
        self.kv_caches = []
        self.model = None
        if self.onednn is not None:
            self.onednn.clear()
        self.sampler.clear()


def create(model_config: ModelConfig, weights: dict[str, np.ndarray], options: BackendOptions) -> CPUBackend:
    """The registry's factory (``backends.registry``): ``dtype="auto"`` is ``DEFAULT_DTYPE``."""
    return CPUBackend(model_config, weights, dtype=options.resolve_dtype(DEFAULT_DTYPE), seed=options.seed,
                      num_threads=options.num_threads, eos_token_ids=options.eos_token_ids)
