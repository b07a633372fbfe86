"""The decoder of every supported family in MLX over a paged KV cache.

The same model as ``backends/torch_model`` (which the cpu backend runs and the
tests compare against), on a flattened token batch: the new tokens of every
scheduled request laid end to end, ``T`` tokens in all. What differs between
families comes from the ``ModelConfig`` (``model.config``). Per layer::

    q, k, v = split(qkv(norm(x)))                 q, k = norm_qk(q, k) (qk_norm); rope(q, k)
    a   = o_proj(attn(q, k, v))                   a = norm(a) (sandwich_norms)
    h   = x + a
    m   = mlp(norm(h))                            down(act(gate) * up), or the experts (MoE)
    out = h + m                                   m = norm(m) (sandwich_norms)

RoPE per layer is ``backends.metal.rope``. The mixture of experts routes in
float32 and runs the (token, expert) pairs sorted by expert through
``mx.gather_mm`` (one batched GEMM over the selected experts, no host sync).
Logits are computed only for the rows in ``logits_indices``, in float32,
soft-capped where the family says. Every projection goes through ``linear``
and the token lookup through ``embedding`` (``backends.metal.weights``: dense
or kept quantized, ``mx.quantized_matmul``). The forward pass only builds
MLX's lazy graph; the caller evaluates it (logits and new caches together)
once per step.
"""

from __future__ import annotations

import math
from typing import Sequence

import mlx.core as mx

from backends.metal.attention import KVCache, MetalAttention, MetalAttentionMetadata
from backends.metal.rope import MLXRotary, apply_rope, rope_inv_freq
from backends.metal.weights import LayerWeights, embedding, linear, load_weights, weight_arrays
from model.config import ModelConfig

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
__all__ = ["DTYPES", "LayerWeights", "MLXLlamaModel", "apply_rope", "linear", "load_weights", "mlx_dtype",
           "rope_inv_freq"]


def mlx_dtype(name: str) -> mx.Dtype:
    """The MLX dtype of a backend dtype name (``float32``, ``bfloat16`` or ``float16``)."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """RMSNorm over the last dim in ``x``'s dtype (a float32 weight scales before the cast back)."""
    if weight.dtype == x.dtype:
        return mx.fast.rms_norm(x, weight, eps)
    return mx.fast.rms_norm(x.astype(mx.float32), weight, eps).astype(x.dtype)


def silu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (PyTorch's ``approximate="tanh"``)."""
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}


def gather_mm(a: mx.array, b: mx.array, experts: mx.array) -> mx.array:
    """``a[i] @ b[experts[i]]`` for sorted ``experts`` (MLX's CPU build multiplies only float32: upcast there)."""
    if a.dtype != mx.float32 and mx.default_device() == mx.cpu:
        out = mx.gather_mm(a.astype(mx.float32), b.astype(mx.float32), rhs_indices=experts, sorted_indices=True)
        return out.astype(a.dtype)
    return mx.gather_mm(a, b, rhs_indices=experts, sorted_indices=True)


def moe(x: mx.array, w: LayerWeights, config: ModelConfig, act) -> mx.array:
    """The mixture-of-experts MLP on ``x`` ``[T, hidden]`` (see ``backends.torch_model.moe``)."""
    num_tokens, k = x.shape[0], config.num_experts_per_tok
    probs = mx.softmax(linear(x, w.router).astype(mx.float32), axis=-1, precise=True)   # [T, E]
    ids = mx.argsort(-probs, axis=-1)[:, :k]                                             # [T, k]
    weights = mx.take_along_axis(probs, ids, axis=-1)                                    # [T, k]
    if config.norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    flat = ids.reshape(-1)                                                               # [T*k]
    order = mx.argsort(flat)                                                             # [T*k]: pairs by expert
    token_of = order // k                                                                # [T*k]
    rows = x[token_of][:, None, :]                                                       # [T*k, 1, hidden]
    experts = flat[order]                                                                # [T*k] sorted
    gate_up = gather_mm(rows, w.experts_gate_up, experts)                                # [T*k, 1, 2I]
    gate, up = mx.split(gate_up, 2, axis=-1)                                             # [T*k, 1, I] each
    down = gather_mm(act(gate) * up, w.experts_down, experts)                            # [T*k, 1, hidden]
    pair_out = down[:, 0, :] * weights.reshape(-1)[order][:, None].astype(x.dtype)       # [T*k, hidden]
    out = mx.zeros_like(x).at[token_of].add(pair_out)                                    # [T, hidden]
    if w.shared_gate_up is not None:
        s_gate, s_up = mx.split(linear(x, w.shared_gate_up), 2, axis=-1)                 # [T, S] each
        shared = linear(act(s_gate) * s_up, w.shared_down)                               # [T, hidden]
        out = out + mx.sigmoid(linear(x, w.shared_gate)) * shared                        # [T, hidden]
    return out


class MLXLlamaModel:
    """Decoder weights plus the forward pass for every family; holds no per-step state."""

    def __init__(self, config: ModelConfig, weights: dict, dtype: mx.Dtype = mx.float32) -> None:
        self.config = config
        self.dtype = dtype
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.act = ACTIVATIONS[config.hidden_act]
        self.embed, self.layers, self.final_norm, self.lm_head = load_weights(config, weights, dtype)
        ropes = [repr(config.layer_rope(i)) for i in range(config.num_hidden_layers)]
        distinct = list(dict.fromkeys(ropes))
        self.rotaries = [MLXRotary.of(config, ropes.index(key)) for key in distinct]
        self.rope_index = [distinct.index(key) for key in ropes]
        self.layer_attention = [config.layer_attention(i) for i in range(config.num_hidden_layers)]
        self.embed_scale = None if config.embedding_scale is None else \
            mx.array(config.embedding_scale, dtype=mx.float32).astype(dtype)      # HF: the scale in the weight dtype
        # Built on the caller's thread, stepped on the engine's: MLX streams are per
        # thread, so nothing lazy may cross (the weights are evaluated by load_weights).
        mx.eval([r.arrays() for r in self.rotaries], [] if self.embed_scale is None else self.embed_scale)
        self.attention = MetalAttention(self.num_heads, self.num_kv_heads, self.head_dim, config.attention_scale)

    def weight_bytes(self) -> int:
        """Bytes of the model's distinct weight arrays, packed ones at their packed size (a tied head once)."""
        return sum(a.nbytes for a in weight_arrays([self.embed, self.lm_head, self.final_norm, *self.layers]))

    def forward(
        self,
        input_ids: mx.array,
        positions: mx.array,
        kv_caches: Sequence[KVCache],
        metadata: MetalAttentionMetadata,
        logits_indices: mx.array,
    ) -> tuple[mx.array, list[KVCache]]:
        """The step's float32 logits ``[N, vocab]`` of ``logits_indices`` and the new KV caches.

        ``input_ids``, ``positions`` ``[T]`` and ``logits_indices`` ``[N]`` are
        int32; ``kv_caches`` has one ``(k_cache, v_cache)`` per layer. Lazy:
        evaluate the logits and the returned caches together.
        """
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"need one KV cache per layer ({len(self.layers)}), got {len(kv_caches)}")
        x = embedding(self.embed, input_ids, self.dtype)                                   # [T, hidden]
        if self.embed_scale is not None:
            x = x * self.embed_scale                                                       # [T, hidden]
        new_caches = []
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            x, kv_cache = self._layer(i, layer, x, positions, kv_cache, metadata)          # [T, hidden]
            new_caches.append(kv_cache)
        x = x[logits_indices]                                                              # [N, hidden]
        x = rms_norm(x, self.final_norm, self.config.rms_norm_eps)                         # [N, hidden]
        logits = linear(x, self.lm_head)                                                   # [N, vocab]
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = mx.tanh(logits / cap) * cap
        return logits.astype(mx.float32), new_caches

    def _layer(self, i: int, w: LayerWeights, x: mx.array, positions: mx.array, kv_cache: KVCache,
               metadata: MetalAttentionMetadata) -> tuple[mx.array, KVCache]:
        num_tokens = x.shape[0]
        h_q, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        eps = self.config.rms_norm_eps

        h = rms_norm(x, w.input_norm, eps)                                                 # [T, hidden]
        qkv = linear(h, w.qkv, w.qkv_bias)                                                 # [T, (H + 2*Hkv) * D]
        qk = qkv[:, : (h_q + h_kv) * d].reshape(num_tokens, h_q + h_kv, d)                 # [T, H + Hkv, D]
        if w.q_norm is not None:
            qk = mx.concatenate([rms_norm(qk[:, :h_q], w.q_norm, eps), rms_norm(qk[:, h_q:], w.k_norm, eps)], axis=1)
        qk = self.rotaries[self.rope_index[i]].apply(qk, positions, metadata.token_context_lens)  # [T, H + Hkv, D]
        q = qk[:, :h_q]                                                                    # [T, H, D]
        k = qk[:, h_q:]                                                                    # [T, Hkv, D]
        v = qkv[:, (h_q + h_kv) * d:].reshape(num_tokens, h_kv, d)                         # [T, Hkv, D]
        attn, kv_cache = self.attention.forward(q, k, v, kv_cache, metadata, self.layer_attention[i])  # [T, H, D]
        o = linear(attn.reshape(num_tokens, h_q * d), w.o_proj)                            # [T, hidden]
        if w.attn_out_norm is not None:
            o = rms_norm(o, w.attn_out_norm, eps)
        x = x + o                                                                          # [T, hidden]

        h = rms_norm(x, w.post_norm, eps)                                                  # [T, hidden]
        if w.router is not None:
            m = moe(h, w, self.config, self.act)                                           # [T, hidden]
        else:
            gate, up = mx.split(linear(h, w.gate_up), 2, axis=-1)                          # [T, inter] each
            m = linear(self.act(gate) * up, w.down)                                        # [T, hidden]
        if w.mlp_out_norm is not None:
            m = rms_norm(m, w.mlp_out_norm, eps)
        return x + m, kv_cache                                                             # [T, hidden]
