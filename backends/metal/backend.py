"""The metal backend: the Llama-family model in MLX over the paged KV cache.

On Apple Silicon MLX runs on the GPU (Metal); elsewhere on MLX's CPU build,
which is how CI tests it against the cpu backend. One ``execute`` call:

1. drops the state (seeded keys) of finished / preempted requests;
2. turns the scheduler's plain lists into int32 MLX arrays and the attention
   metadata, once for all layers;
3. builds the forward pass lazily and evaluates the logits and every layer's
   new K/V cache in one ``mx.eval`` (so no graph outlives the step, and the
   cache scatters reuse the cache buffers);
4. samples the requests with ``needs_sample``.
"""

from __future__ import annotations

from itertools import chain

import mlx.core as mx
import numpy as np

from backends.base import Backend, BackendOptions, LogitRows, blocks_for_memory, kv_block_bytes, run_step
from backends.metal.attention import KVCache, build_attention_metadata
from backends.metal.model import MLXLlamaModel, mlx_dtype
from backends.metal.sampler import MetalSampler
from model.config import ModelConfig
from scheduler.output import SchedulerOutput, StepResult


def _take_rows(logits: mx.array, rows: list[int]) -> mx.array:
    return logits[mx.array(np.asarray(rows, dtype=np.int32))]                                      # [R, V]


# How run_step reads the all-token logits (prompt logprobs).
MLX_LOGIT_ROWS = LogitRows(take=_take_rows,
                           to_numpy=lambda logits, rows: np.array(_take_rows(logits, rows).astype(mx.float32)))


class MetalBackend(Backend):
    """``Backend`` on MLX (see ``backends/base.py`` for the life cycle).

    ``dtype`` is the compute and KV cache dtype: ``float16`` / ``bfloat16`` on
    Apple GPUs, ``float32`` where asked (and for parity tests). The engine's
    ``num_threads`` does not reach it (``create`` leaves it out): MLX sizes
    its own CPU pool.
    """

    name = "metal"

    def __init__(
        self,
        model_config: ModelConfig,
        weights: dict,
        dtype: str = "float32",
        seed: int = 0,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        self._mx_dtype = mlx_dtype(dtype)
        self.dtype = dtype
        self.model_config = model_config
        self.device = str(mx.default_device())
        self.model = MLXLlamaModel(model_config, weights, self._mx_dtype)
        self.sampler = MetalSampler(eos_token_ids or model_config.eos_token_ids, seed=seed)
        self.kv_caches: list[KVCache] = []
        self.block_size = 0
        self.num_blocks = 0

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes one KV block costs across all layers (K and V)."""
        c = self.model_config
        return kv_block_bytes(c.num_hidden_layers, block_size, c.num_key_value_heads, c.head_dim, self._mx_dtype.size)

    def num_blocks_for_memory(self, memory_bytes: int, block_size: int) -> int:
        """How many KV blocks fit ``memory_bytes``."""
        return blocks_for_memory(memory_bytes, self.kv_block_bytes(block_size))

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """One zeroed ``[num_blocks, block_size, Hkv, D]`` K and V array per layer."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        c = self.model_config
        shape = (num_blocks, block_size, c.num_key_value_heads, c.head_dim)
        self.kv_caches = [(mx.zeros(shape, dtype=self._mx_dtype), mx.zeros(shape, dtype=self._mx_dtype))
                          for _ in range(c.num_hidden_layers)]
        mx.eval(self.kv_caches)
        self.num_blocks = num_blocks
        self.block_size = block_size

    def execute(self, scheduler_output: SchedulerOutput) -> StepResult:
        """Run one step: write new K/V, attend, sample where ``needs_sample``."""
        return run_step(scheduler_output, self.sampler.drop, self.compute_logits, self.sampler.sample,
                        MLX_LOGIT_ROWS)

    def compute_logits(self, scheduler_output: SchedulerOutput, all_tokens: bool = False) -> mx.array:
        """Run the model over the step; evaluated float32 logits ``[N, V]`` of the requests that sample.

        Rows follow the order of ``scheduled`` among those with ``needs_sample``;
        with ``all_tokens`` every scheduled token gets its row (``[T, V]``).
        Writes the step's K/V into the cache like ``execute`` (which calls it).
        """
        if not self.kv_caches:
            raise RuntimeError("allocate_kv_cache must be called before execute")
        if scheduler_output.block_size != self.block_size:
            raise ValueError(f"step block_size {scheduler_output.block_size} != cache block_size {self.block_size}")
        scheduled = scheduler_output.scheduled
        query_lens = [len(r.token_ids) for r in scheduled]
        input_ids = mx.array(np.fromiter(chain.from_iterable(r.token_ids for r in scheduled), dtype=np.int32))  # [T]
        positions = mx.array(np.concatenate([
            np.arange(r.num_computed_tokens, r.num_computed_tokens + n, dtype=np.int32)
            for r, n in zip(scheduled, query_lens)
        ]))                                                                              # [T]
        ends = np.cumsum(query_lens)
        if all_tokens:
            logits_indices = mx.arange(int(ends[-1]), dtype=mx.int32)                    # [T]
        else:
            sample_rows = [i for i, r in enumerate(scheduled) if r.needs_sample]
            logits_indices = mx.array((ends[sample_rows] - 1).astype(np.int32))         # [N]
        metadata = build_attention_metadata(
            query_lens,
            [r.num_computed_tokens for r in scheduled],
            [r.block_table for r in scheduled],
            list(chain.from_iterable(r.slot_mapping for r in scheduled)),
            self.block_size,
        )
        caches, self.kv_caches = self.kv_caches, []      # the graph alone holds the old caches: scatter in place
        try:
            logits, caches = self.model.forward(input_ids, positions, caches, metadata, logits_indices)
            mx.eval(logits, caches)
        except BaseException:
            self.kv_caches = caches                      # keep a cache list; the engine fails this step's requests
            raise
        self.kv_caches = caches
        return logits

    def shutdown(self) -> None:
        """Release the KV cache and the weights."""
        self.kv_caches = []
        self.model = None
        self.sampler.clear()


def create(model_config: ModelConfig, weights: dict, options: BackendOptions) -> MetalBackend:
    """The registry's factory (``backends.registry``): ``dtype="auto"`` is float32 here for now."""
    return MetalBackend(model_config, weights, dtype=options.resolve_dtype("float32"), seed=options.seed,
                        eos_token_ids=options.eos_token_ids)
