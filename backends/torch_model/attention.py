"""The interface between the shared torch model and a device's paged attention.

The model computes q/k/v for the flattened new tokens of a step and hands
them, per layer, to an ``AttentionBackend``. The backend owns how K/V reach the
paged cache and how queries read it back (gather + SDPA on CPU, Triton kernels
on CUDA). The step's attention metadata is built once per step by the device
backend and passed through the model untouched; the model never looks inside.

KV cache of one layer (the layout every backend shares)::

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot s  <->  k_cache.view(-1, num_kv_heads, head_dim)[s]
    slot of position p of a request = block_table[p // block_size] * block_size + p % block_size
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from model.config import LayerAttention

KVCache = tuple[torch.Tensor, torch.Tensor]   # (k_cache, v_cache) of one layer


class AttentionBackend(Protocol):
    """Paged attention over the flattened tokens of one step."""

    def forward(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: KVCache,
        metadata: Any,
        layer: LayerAttention | None = None,
    ) -> torch.Tensor:
        """Write ``k``/``v`` of all new tokens into ``kv_cache``, then attend.

        Called once per layer, in layer order, on the step thread.
        ``q`` is ``[T, num_heads, head_dim]``, ``k`` and ``v`` are
        ``[T, num_kv_heads, head_dim]`` (RoPE already applied to q and k);
        ``metadata`` is whatever the device backend built for this step;
        ``layer`` is the layer's scale, sliding window and soft-cap (None:
        the backend's scale, full attention, no cap).
        Returns the attention output ``[T, num_heads, head_dim]``.
        """

    def token_context_lens(self, metadata: Any) -> torch.Tensor:
        """``[T]`` int64: for each new token, its request's context length after this step.

        Called at most once per step, before the layers, by models whose
        rotary embedding depends on it (longrope).
        """
