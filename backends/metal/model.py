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
soft-capped where the family says. Every dense projection goes through
``linear``. The forward pass only builds MLX's lazy graph; the caller
evaluates it (logits and new caches together) once per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import numpy as np

from backends.metal.attention import KVCache, MetalAttention, MetalAttentionMetadata
from backends.metal.rope import MLXRotary, apply_rope, rope_inv_freq
from model.config import ModelConfig
from model.weights.canonical import expected_shapes

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
__all__ = ["DTYPES", "LayerWeights", "MLXLlamaModel", "apply_rope", "linear", "load_weights", "mlx_dtype",
           "rope_inv_freq"]


def mlx_dtype(name: str) -> mx.Dtype:
    """The MLX dtype of a backend dtype name (``float32``, ``bfloat16`` or ``float16``)."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass
class LayerWeights:
    """One decoder layer, fused and in the model dtype (``[out, in]`` layout; norms offset)."""

    input_norm: mx.array                    # [hidden]
    qkv: mx.array                           # [(H + 2*Hkv) * D, hidden]
    qkv_bias: mx.array | None               # [(H + 2*Hkv) * D] (attention_bias only)
    o_proj: mx.array                        # [hidden, H * D]
    post_norm: mx.array                     # [hidden]: the pre-MLP norm
    gate_up: mx.array | None = None         # [2 * intermediate, hidden] (dense layers)
    down: mx.array | None = None            # [hidden, intermediate] (dense layers)
    q_norm: mx.array | None = None          # [D] (qk_norm)
    k_norm: mx.array | None = None          # [D] (qk_norm)
    attn_out_norm: mx.array | None = None   # [hidden] (sandwich_norms)
    mlp_out_norm: mx.array | None = None    # [hidden] (sandwich_norms)
    router: mx.array | None = None          # [E, hidden] (MoE layers)
    experts_gate_up: mx.array | None = None  # [E, hidden, 2 * I]: transposed for gather_mm
    experts_down: mx.array | None = None    # [E, I, hidden]: transposed for gather_mm
    shared_gate_up: mx.array | None = None  # [2 * S, hidden] (a shared expert)
    shared_down: mx.array | None = None     # [hidden, S]
    shared_gate: mx.array | None = None     # [1, hidden]


def load_weights(config: ModelConfig, weights: dict[str, np.ndarray], dtype: mx.Dtype):
    """Check ``weights`` against the canonical shapes and fuse them into MLX arrays.

    Returns ``(embed, layers, final_norm, lm_head)``; ``lm_head`` is ``embed``
    itself when the embeddings are tied. Norm weights get the family's
    ``norm_weight_offset`` (Gemma's ``1 + weight``) in float32 and stay float32
    for ``norm_in_float32`` families. Raises ``ValueError`` naming the first
    missing or mis-shaped tensor.
    """
    shapes = expected_shapes(config)
    if "lm_head.weight" in weights and "lm_head.weight" not in shapes:
        shapes = {**shapes, "lm_head.weight": (config.vocab_size, config.hidden_size)}
    traits = config.traits
    norm_dtype = mx.float32 if traits.norm_in_float32 else dtype

    def get(name: str) -> np.ndarray:
        if name not in weights:
            raise ValueError(f"weight {name!r} is missing")
        array = np.asarray(weights[name])
        if tuple(array.shape) != shapes[name]:
            raise ValueError(f"weight {name!r} has shape {tuple(array.shape)}, expected {shapes[name]}")
        return array

    def to_mx(*names: str, axis: int = 0, transpose: bool = False) -> mx.array:
        arrays = [get(n) for n in names]
        joined = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=axis)
        if transpose:
            joined = np.swapaxes(joined, -1, -2)
        return mx.array(np.ascontiguousarray(joined, dtype=np.float32)).astype(dtype)

    def norm(name: str) -> mx.array | None:
        if name not in shapes:
            return None
        offset = np.float32(traits.norm_weight_offset)
        return mx.array(np.asarray(get(name), dtype=np.float32) + offset).astype(norm_dtype)

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        sandwich = traits.sandwich_norms
        layer = LayerWeights(
            input_norm=norm(p + "input_layernorm.weight"),
            qkv=to_mx(*(f"{attn}{x}_proj.weight" for x in "qkv")),                     # [(H + 2*Hkv) * D, hidden]
            qkv_bias=to_mx(*(f"{attn}{x}_proj.bias" for x in "qkv")) if config.attention_bias else None,
            o_proj=to_mx(attn + "o_proj.weight"),
            post_norm=norm(p + ("pre_feedforward_layernorm.weight" if sandwich else "post_attention_layernorm.weight")),
            q_norm=norm(attn + "q_norm.weight"),
            k_norm=norm(attn + "k_norm.weight"),
            attn_out_norm=norm(p + "post_attention_layernorm.weight") if sandwich else None,
            mlp_out_norm=norm(p + "post_feedforward_layernorm.weight"),
        )
        if config.is_moe_layer(i):
            layer.router = to_mx(mlp + "gate.weight")                                     # [E, hidden]
            layer.experts_gate_up = to_mx(mlp + "experts.gate_proj.weight", mlp + "experts.up_proj.weight",
                                          axis=1, transpose=True)                         # [E, hidden, 2I]
            layer.experts_down = to_mx(mlp + "experts.down_proj.weight", transpose=True)  # [E, I, hidden]
            if config.shared_expert_intermediate_size:
                s = mlp + "shared_expert."
                layer.shared_gate_up = to_mx(s + "gate_proj.weight", s + "up_proj.weight")  # [2S, hidden]
                layer.shared_down = to_mx(s + "down_proj.weight")
                layer.shared_gate = to_mx(mlp + "shared_expert_gate.weight")              # [1, hidden]
        else:
            layer.gate_up = to_mx(mlp + "gate_proj.weight", mlp + "up_proj.weight")       # [2 * inter, hidden]
            layer.down = to_mx(mlp + "down_proj.weight")
        layers.append(layer)
    embed = to_mx("model.embed_tokens.weight")                                            # [vocab, hidden]
    lm_head = embed
    if "lm_head.weight" in weights and not config.tie_word_embeddings:
        lm_head = to_mx("lm_head.weight")                                                 # [vocab, hidden]
    final_norm = norm("model.norm.weight")
    mx.eval(embed, lm_head, final_norm, [[a for a in vars(layer).values() if a is not None] for layer in layers])
    return embed, layers, final_norm, lm_head


def linear(x: mx.array, w: mx.array, bias: mx.array | None = None) -> mx.array:
    """``x @ w.T (+ bias)``: ``x [T, in]``, ``w [out, in]`` → ``[T, out]``."""
    if bias is None:
        return x @ w.T                                                                    # [T, out]
    return mx.addmm(bias, x, w.T)                                                         # [T, out]


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

    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray], dtype: mx.Dtype = mx.float32) -> None:
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
        x = self.embed[input_ids]                                                          # [T, hidden]
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
