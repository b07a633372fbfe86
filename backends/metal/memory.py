"""Memory policy of the metal backend: its default dtype, the KV cache budget, MLX's limits and counters.

Apple GPUs share the system's memory with the CPU. Metal reports how much of
it a process may keep resident without slowing the GPU down
(``mx.device_info()["max_recommended_working_set_size"]``, Metal's
``recommendedMaxWorkingSetSize``); MLX's CPU build (Linux CI) reports no such
key, and there the engine's default KV cache size applies.

- **dtype**: ``auto`` is ``bfloat16`` (``AUTO_DTYPE``, why below).
- **KV cache**: ``gpu_memory_utilization`` (the flag both GPU backends read)
  times the working set, less what is resident once the weights are loaded
  (``mx.get_active_memory()``), less a reserve for the largest step's
  activations, shared between the cache and the largest transient the
  attention makes (one layer's gathered K and V, at most the cache's size
  divided by the layer count): ``kv_cache_budget``.
- **limits** (``MemoryLimits``, set once the cache is allocated, on Metal
  only): the wired limit is the recommended working set, as mlx-lm sets it
  while it generates, so that weights and cache stay resident rather than
  being paged out between steps; MLX's buffer cache (freed buffers kept for
  reuse) is capped at the step reserve, so that reusing a step's buffers
  never grows the process past its budget; and the backend empties that
  cache every ``CLEAR_CACHE_EVERY`` steps, as mlx-lm does while decoding.
- **counters**: ``memory_stats()``: active, peak and cached bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from model.config import ModelConfig

# bfloat16 rather than float16: checkpoints are trained and published in bf16
# and bf16 has float32's exponent range, so activations that overflow fp16's
# 65504 (Gemma's embeddings and residual stream, large-logit heads) stay
# finite with no per-family fix-up; fp16's 3 extra mantissa bits do not
# matter next to that. Decode is bound by memory bandwidth, where both are 2
# bytes. MLX's fast kernels (matmul, quantized matmul, SDPA, rms_norm, RoPE)
# take both. Apple GPUs before M2 have no bf16 ALUs: there MLX converts to
# float32 in registers, which costs arithmetic, not bandwidth. Ask for
# ``--dtype float16`` on an M1 to compare.
AUTO_DTYPE = "bfloat16"
WORKING_SET_KEY = "max_recommended_working_set_size"   # mx.device_info()'s key on Metal (bytes)
CLEAR_CACHE_EVERY = 256                                 # steps between mx.clear_cache() calls (mlx-lm's decode period)
_LOGIT_COPIES = 4                                       # float32 [N, V] arrays alive at once (logits, sampling stages)


def recommended_working_set() -> int | None:
    """Bytes Metal recommends this process keep resident; None where MLX reports none (the CPU build)."""
    value = mx.device_info().get(WORKING_SET_KEY)
    return None if value is None else int(value)


def step_reserve_bytes(config: ModelConfig, max_num_batched_tokens: int, max_num_seqs: int, element_size: int) -> int:
    """Bytes the largest step's activations may take at once, besides the cache (an upper estimate).

    Per token: the hidden state twice (residual and normed), the fused QKV
    output and the attention output, the fused gate/up output and the
    activation product; per sampled row: ``_LOGIT_COPIES`` float32 logits.
    Twice the per-token sum: MLX keeps a layer's inputs until its outputs exist.
    """
    c = config
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    inter = max(c.intermediate_size or 0, (c.moe_intermediate_size or 0) * (c.num_experts_per_tok or 0))
    per_token = 2 * c.hidden_size + qkv + c.num_attention_heads * c.head_dim + 3 * inter
    logits = _LOGIT_COPIES * min(max_num_seqs, max_num_batched_tokens) * c.vocab_size * 4
    return 2 * max_num_batched_tokens * per_token * element_size + logits


def kv_cache_budget(working_set: int, utilization: float, resident: int, reserve: int, num_layers: int) -> int:
    """KV cache bytes that ``utilization`` of ``working_set`` leaves (see the module docstring).

    Raises ``ValueError`` when nothing is left, naming what to change.
    """
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    free = int(working_set * utilization) - resident - reserve
    if free <= 0:
        gib = 2 ** 30
        raise ValueError(
            f"no memory left for the KV cache: {utilization} of the {working_set / gib:.1f} GiB working set is "
            f"{working_set * utilization / gib:.1f} GiB, the weights take {resident / gib:.1f} GiB and a step "
            f"{reserve / gib:.1f} GiB; raise --gpu-memory-utilization, lower --max-num-batched-tokens, "
            f"or give --kv-cache-memory")
    return free * num_layers // (num_layers + 1)     # the cache plus one layer's gathered K/V fit in `free`


@dataclass
class MemoryLimits:
    """MLX's wired and buffer-cache limits while the backend lives; ``restore`` puts the old ones back."""

    wired_limit: int | None = None        # what was set (None: not set, not on Metal)
    cache_limit: int | None = None
    _old_wired: int | None = None
    _old_cache: int | None = None

    def apply(self, working_set: int | None, reserve: int) -> None:
        """Wire up to ``working_set`` and cap the buffer cache at ``reserve`` (Metal only: ``working_set`` set)."""
        if working_set is None or not mx.metal.is_available():
            return
        self._old_wired = mx.set_wired_limit(working_set)
        self._old_cache = mx.set_cache_limit(reserve)
        self.wired_limit, self.cache_limit = working_set, reserve

    def restore(self) -> None:
        """The limits from before ``apply`` (after the device finished its work, as the wired limit requires)."""
        if self.wired_limit is None:
            return
        mx.synchronize()
        mx.set_wired_limit(self._old_wired)
        mx.set_cache_limit(self._old_cache)
        self.wired_limit = self.cache_limit = None


def memory_stats() -> dict[str, int]:
    """MLX's allocator counters in bytes: ``active`` (held by arrays), ``peak`` (since start) and ``cache``."""
    return {"active": mx.get_active_memory(), "peak": mx.get_peak_memory(), "cache": mx.get_cache_memory()}
