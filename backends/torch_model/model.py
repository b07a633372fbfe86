"""The decoder of every supported family over a paged KV cache, in torch (cpu backend, tensor parallel).

Runs on a flattened token batch: the new tokens of every scheduled request
laid end to end, no padding between requests (``T`` tokens in all). Attention
is delegated to an ``AttentionBackend``; everything else (embedding, RMSNorm,
RoPE, GQA projections, gated MLP or mixture of experts, LM head) is here.
What differs between families is read from the ``ModelConfig`` (see
``model.config``), never from a class per family. Per layer::

    q, k, v = split(qkv(norm(x)))                 q, k = norm_qk(q, k) (qk_norm); rope(q, k)
    a   = o_proj(attn(q, k, v))                   a = norm(a) (sandwich_norms)
    h   = x + a
    m   = mlp(norm(h))                            down(act(gate) * up), or the experts (MoE)
    out = h + m                                   m = norm(m) (sandwich_norms)

Logits are computed only for the rows in ``logits_indices`` (the last token
of each request that samples), in float32, soft-capped where the family says.
Every projection goes through ``self.linear`` (the device's GEMM helper).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from backends.torch_model.attention import AttentionBackend, KVCache
from backends.torch_model.moe import moe_forward
from backends.torch_model.rope import apply_rope, rotary_cos_sin, rotary_for
from backends.torch_model.weights import LayerWeights, load_weights
from model.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: HF ``LlamaRMSNorm``, or Gemma's where ``weight`` is float32.

    Normalises in float32; a weight in the model dtype scales after the cast
    back (Llama), a float32 weight before it (Gemma's ``(x * (1 + w)).to(dtype)``).
    """
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)                     # [..., n]
    xf = x.float()                                                            # [..., n]
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)             # [..., n]
    if weight.dtype == torch.float32:
        return (xf * weight).to(x.dtype)                                      # [..., n]
    return weight * xf.to(x.dtype)                                            # [..., n]


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(x / cap)`` (HF's soft-capping); ``x`` itself without a cap."""
    if cap is None:
        return x
    return torch.tanh(x / cap) * cap


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}

Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class LlamaModel:
    """Decoder weights plus the forward pass for every family; holds no per-step state.

    ``attention`` is the device's paged attention; ``dtype`` is the compute
    and KV cache dtype (``torch.float32`` or ``torch.bfloat16``). ``linear``
    has the signature of ``F.linear`` (``x [T, in]``, ``w [out, in]``,
    optional bias) and may return a non-contiguous ``[T, out]`` view; devices
    pass their fastest GEMM orientation (and a quantized one may slot in).
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
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.act = ACTIVATIONS[config.hidden_act]
        # One rotary per distinct (base, scaling) of the layers; rope_index[i] picks layer i's.
        ropes = [repr(config.layer_rope(i)) for i in range(config.num_hidden_layers)]
        distinct = list(dict.fromkeys(ropes))
        self.rotaries = [rotary_for(config, ropes.index(key)).to(self.device) for key in distinct]
        self.rope_index = [distinct.index(key) for key in ropes]
        self.needs_context_lens = any(r.long_inv_freq is not None for r in self.rotaries)
        self.layer_attention = [config.layer_attention(i) for i in range(config.num_hidden_layers)]
        self.embed_scale = None if config.embedding_scale is None else \
            torch.tensor(config.embedding_scale, dtype=torch.float32).to(dtype)       # HF: the scale in the weight dtype
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
        context_lens = self.attention.token_context_lens(attn_metadata) if self.needs_context_lens else None
        rope = [rotary_cos_sin(r, positions, self.dtype, context_lens) for r in self.rotaries]  # [T, 1, R/2] each
        x = self.embedding(input_ids, self.weights.embed)                      # [T, hidden]
        if self.embed_scale is not None:
            x = x * self.embed_scale                                           # [T, hidden]
        for i, layer in enumerate(self.weights.layers):
            cos, sin = rope[self.rope_index[i]]
            x = self._layer(i, layer, x, cos, sin, kv_caches[i], attn_metadata)  # [T, hidden]
        x = x.index_select(0, logits_indices)                                   # [N, hidden]
        x = rms_norm(x, self.weights.final_norm, self.config.rms_norm_eps)      # [N, hidden]
        logits = self.linear(x, self.weights.lm_head, None)                     # [N, vocab]
        return softcap(logits, self.config.final_logit_softcap).float().contiguous()  # [N, vocab]

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.all_reduce is None else self.all_reduce(x)

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
        qk = qkv[:, : (h_q + h_kv) * d].reshape(num_tokens, h_q + h_kv, d)      # [T, H + Hkv, D]
        if w.q_norm is not None:
            qk = torch.cat((rms_norm(qk[:, :h_q], w.q_norm, eps), rms_norm(qk[:, h_q:], w.k_norm, eps)), dim=1)
        qk = apply_rope(qk, cos, sin)                                          # [T, H + Hkv, D]
        q = qk[:, :h_q]                                                        # [T, H, D]
        k = qk[:, h_q:]                                                        # [T, Hkv, D]
        v = qkv[:, (h_q + h_kv) * d:].reshape(num_tokens, h_kv, d)              # [T, Hkv, D]
        attn = self.attention.forward(layer_idx, q, k, v, kv_cache, attn_metadata,
                                      self.layer_attention[layer_idx])         # [T, H, D]
        o = self._reduce(linear(attn.reshape(num_tokens, h_q * d), w.o_proj, None))  # [T, hidden]
        if w.attn_out_norm is not None:
            o = rms_norm(o, w.attn_out_norm, eps)                              # [T, hidden]
        x = x + o                                                              # [T, hidden]

        h = rms_norm(x, w.post_norm, eps)                                      # [T, hidden]
        if w.router is not None:
            m = moe_forward(h, w, self.config, linear, self.act)               # [T, hidden]
        else:
            m = self._mlp(h, w.gate_up, w.down)                                # [T, hidden]
        m = self._reduce(m)
        if w.mlp_out_norm is not None:
            m = rms_norm(m, w.mlp_out_norm, eps)                               # [T, hidden]
        return x + m                                                           # [T, hidden]

    def _mlp(self, h: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear(h, gate_up, None).chunk(2, dim=-1)             # [T, inter] each
        return self.linear(self.act(gate) * up, down, None)                   # [T, hidden]
