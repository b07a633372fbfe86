"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over a paged KV cache.

Runs on a flattened token batch: the new tokens of every scheduled request
laid end to end, no padding between requests (``T`` tokens in all). Attention
is delegated to an ``AttentionBackend``; everything else (embedding, RMSNorm,
RoPE, GQA projections, SwiGLU MLP, LM head) is here, shared by the cpu and
cuda backends.

Per layer::

    h   = x + o_proj(attn(rope(q), rope(k), v))     q, k, v = split(qkv(rmsnorm(x)))
    out = h + down(silu(gate) * up)                 gate, up = split(gate_up(rmsnorm(h)))

Logits are computed only for the rows in ``logits_indices`` (the last token
of each request that samples), in float32.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from backends.torch_model.attention import AttentionBackend, KVCache
from backends.torch_model.rope import apply_rope, compute_inv_freq, rope_cos_sin
from backends.torch_model.weights import LayerWeights, load_weights
from engine.model_config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``LlamaRMSNorm``: normalise in float32, scale in the model dtype."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)                     # [T, hidden]
    xf = x.float()                                                            # [T, hidden]
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)             # [T, hidden]
    return weight * xf.to(x.dtype)                                            # [T, hidden]


Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class LlamaModel:
    """Decoder weights plus the forward pass; holds no per-step state.

    ``attention`` is the device's paged attention; ``dtype`` is the compute
    and KV cache dtype (``torch.float32`` or ``torch.bfloat16``). ``linear``
    has the signature of ``F.linear`` (``x [T, in]``, ``w [out, in]``,
    optional bias) and may return a non-contiguous ``[T, out]`` view; devices
    pass their fastest GEMM orientation.
    """

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, np.ndarray],
        attention: AttentionBackend,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        linear: Linear = F.linear,
    ) -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.config = config
        self.attention = attention
        self.linear = linear
        self.dtype = dtype
        self.device = torch.device(device)
        self.weights = load_weights(config, weights, dtype)
        if self.device.type != "cpu":
            self._move_weights()
        self.inv_freq = compute_inv_freq(config).to(self.device)                 # [D/2]
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        # Tensor parallelism (backends/tp) sets these on a shard's model: a sum over
        # the ranks of the row-parallel o_proj / down outputs, and a vocab-parallel lookup.
        self.all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.embedding: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.embedding

    def _move_weights(self) -> None:
        w = self.weights
        for layer in w.layers:
            for name, t in vars(layer).items():
                if t is not None:
                    setattr(layer, name, t.to(self.device))
        tied = w.lm_head is w.embed
        w.embed = w.embed.to(self.device)
        w.final_norm = w.final_norm.to(self.device)
        w.lm_head = w.embed if tied else w.lm_head.to(self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[KVCache],
        attn_metadata: Any,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """Run the step; return float32 logits ``[N, vocab]`` of ``logits_indices``.

        ``input_ids`` and ``positions`` are ``[T]`` int64, ``logits_indices``
        is ``[N]`` int64 (rows of the flattened batch), ``kv_caches`` has one
        ``(k_cache, v_cache)`` per layer. Call under ``torch.inference_mode()``.
        """
        if len(kv_caches) != len(self.weights.layers):
            raise ValueError(f"need one KV cache per layer ({len(self.weights.layers)}), got {len(kv_caches)}")
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.dtype)          # [T, 1, D/2] each
        x = self.embedding(input_ids, self.weights.embed)                      # [T, hidden]
        for i, layer in enumerate(self.weights.layers):
            x = self._layer(i, layer, x, cos, sin, kv_caches[i], attn_metadata)  # [T, hidden]
        x = x.index_select(0, logits_indices)                                   # [N, hidden]
        x = rms_norm(x, self.weights.final_norm, self.config.rms_norm_eps)      # [N, hidden]
        return self.linear(x, self.weights.lm_head, None).float().contiguous()  # [N, vocab]

    def _layer(
        self,
        layer_idx: int,
        w: LayerWeights,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        attn_metadata: Any,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        h_q, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        eps = self.config.rms_norm_eps

        linear = self.linear
        h = rms_norm(x, w.input_norm, eps)                                     # [T, hidden]
        qkv = linear(h, w.qkv, w.qkv_bias)                                     # [T, (H + 2*Hkv) * D]
        qk = qkv[:, : (h_q + h_kv) * d].view(num_tokens, h_q + h_kv, d)         # [T, H + Hkv, D]
        qk = apply_rope(qk, cos, sin)                                          # [T, H + Hkv, D]
        q = qk[:, :h_q]                                                        # [T, H, D]
        k = qk[:, h_q:]                                                        # [T, Hkv, D]
        v = qkv[:, (h_q + h_kv) * d:].view(num_tokens, h_kv, d)                 # [T, Hkv, D]
        attn = self.attention.forward(layer_idx, q, k, v, kv_cache, attn_metadata)  # [T, H, D]
        o = linear(attn.reshape(num_tokens, h_q * d), w.o_proj, None)         # [T, hidden]
        x = x + (o if self.all_reduce is None else self.all_reduce(o))         # [T, hidden]

        h = rms_norm(x, w.post_norm, eps)                                      # [T, hidden]
        gate_up = linear(h, w.gate_up, None)                                   # [T, 2 * inter]
        gate, up = gate_up.chunk(2, dim=-1)                                    # [T, inter] each
        down = linear(F.silu(gate) * up, w.down, None)                         # [T, hidden]
        return x + (down if self.all_reduce is None else self.all_reduce(down))  # [T, hidden]
