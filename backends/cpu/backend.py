"""The cpu backend: the shared torch model with gather-based paged attention.

It is both the reference every device backend is tested against and the
default on machines without a GPU. One ``execute`` call:

1. drops the state (seeded generators) of finished / preempted requests;
2. updates its persistent input batch (``backends.input_batch``: block-table
   rows change only where a request gained a block or joined) and builds the
   int64 step tensors and the attention metadata from it, once for all layers;
3. runs the model under ``torch.inference_mode`` (logits only for the rows
   that sample);
4. samples the requests with ``needs_sample``.
"""

from __future__ import annotations

import os
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from backends.cpu.attention import CPUAttention
from backends.input_batch import InputBatch
from backends.cpu.native import decode_ops
from backends.sampler import Sampler
from backends.torch_model.model import LlamaModel
from backends.torch_model.weights import torch_dtype
from model.config import ModelConfig
from backends.base import Backend, BackendOptions, LogitRows, blocks_for_memory, kv_block_bytes, run_step
from scheduler.output import SchedulerOutput, StepResult


def available_cores() -> int:
    """CPU cores this process may run on (affinity-aware where the OS says)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# What dtype="auto" means on a CPU (and for the tensor-parallel ranks, which run this backend's model).
DEFAULT_DTYPE = "float32"
# Weights with more output rows than this (the LM head) are multiplied in row
# blocks of this size, each transposed into the output while still in cache.
LINEAR_ROW_BLOCK = 2048
# Without native bfloat16, products of this many rows or more run in float32.
BF16_UPCAST_MIN_ROWS = 4
# Products of this many rows or more (prefill chunks) use F.linear: its
# contiguous [T, out] output makes the following residual adds, RoPE and
# SwiGLU ~25% cheaper per prefill step than reading the transposed view.
CONTIGUOUS_MIN_ROWS = 256
# float32 products of at most this many rows (decode steps) run in the native
# small-batch GEMM (backends/cpu/native/decode_ops.c) where it was built: it
# streams the weight once at close to the memory bandwidth (MKL: ~60% of it at
# 1-2 rows) into a contiguous output; beyond, MKL's blocking wins.
NATIVE_MAX_ROWS = 8


def _take_rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return logits[torch.as_tensor(rows, dtype=torch.int64, device=logits.device)]                  # [R, V]


# How run_step reads a torch backend's all-token logits (prompt logprobs); the cuda backend uses it too.
TORCH_LOGIT_ROWS = LogitRows(take=_take_rows,
                             to_numpy=lambda logits, rows: _take_rows(logits, rows).float().cpu().numpy())


def has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX)."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


def cpu_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
               upcast_min_rows: int | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)``, for few rows as the view ``(w @ x.T).T`` ``[T, out]``.

    On CPU, MKL runs skinny GEMMs (few tokens, a large weight) in this
    orientation 1.3-3x faster than ``F.linear``'s; from ``CONTIGUOUS_MIN_ROWS``
    rows on, plain ``F.linear`` is as fast and its output contiguous; a single row is padded to
    two because the GEMV path streams the weight slower than a 2-row GEMM.
    Wide weights (the LM head) are done in row blocks into a contiguous
    output: transposing a whole ``[vocab, T]`` product afterwards costs as
    much as the GEMM. With ``upcast_min_rows``, bfloat16 products of at least
    that many rows run in float32 (CPUs without native bfloat16 emulate it
    several times slower than converting the weight on the fly). float32
    products of up to ``NATIVE_MAX_ROWS`` rows use the native GEMM when it is available.
    """
    if x.shape[0] <= NATIVE_MAX_ROWS and x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1 \
            and w.is_contiguous() and (bias is None or bias.is_contiguous()):
        ops = decode_ops()
        if ops is not None:
            return ops.linear(x, w, bias)                                              # [T, out]
    if upcast_min_rows is not None and x.dtype == torch.bfloat16 and x.shape[0] >= upcast_min_rows:
        b = None if bias is None else bias.float()
        return cpu_linear(x.float(), w.float(), b).to(torch.bfloat16)                  # [T, out]
    if x.shape[0] == 1:
        return cpu_linear(torch.cat((x, x)), w, bias)[:1]                              # [1, out]
    if x.shape[0] >= CONTIGUOUS_MIN_ROWS:
        return F.linear(x, w, bias)                                                    # [T, out]
    if w.shape[0] > 2 * LINEAR_ROW_BLOCK:
        out = x.new_empty((x.shape[0], w.shape[0]))                                    # [T, out]
        for start in range(0, w.shape[0], LINEAR_ROW_BLOCK):
            end = start + LINEAR_ROW_BLOCK
            b = None if bias is None else bias[start:end]
            out[:, start:end] = cpu_linear(x, w[start:end], b, upcast_min_rows)        # [T, block]
        return out
    if bias is None:
        return torch.mm(w, x.t()).t()                                                  # [T, out]
    return torch.addmm(bias[:, None], w, x.t()).t()                                    # [T, out]


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
        self.model = LlamaModel(model_config, weights, self.attention, self._torch_dtype, linear=linear,
                                ops=decode_ops() if self._torch_dtype == torch.float32 else None)
        self.sampler = Sampler(eos_token_ids or model_config.eos_token_ids, seed=seed)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = 0
        self.num_blocks = 0
        self.input_batch: InputBatch | None = None        # made with the KV cache (it needs the block size)

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
        self.sampler.clear()


def create(model_config: ModelConfig, weights: dict[str, np.ndarray], options: BackendOptions) -> CPUBackend:
    """The registry's factory (``backends.registry``): ``dtype="auto"`` is ``DEFAULT_DTYPE``."""
    return CPUBackend(model_config, weights, dtype=options.resolve_dtype(DEFAULT_DTYPE), seed=options.seed,
                      num_threads=options.num_threads, eos_token_ids=options.eos_token_ids)
