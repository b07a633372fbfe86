"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) in MLX over a paged KV cache.

The same model as ``backends/torch_model`` (which the cpu backend runs and the
tests compare against), on a flattened token batch: the new tokens of every
scheduled request laid end to end, ``T`` tokens in all. Per layer::

    h   = x + o_proj(attn(rope(q), rope(k), v))     q, k, v = split(qkv(rmsnorm(x)))
    out = h + down(silu(gate) * up)                 gate, up = split(gate_up(rmsnorm(h)))

RoPE is ``mx.fast.rope`` in the rotate-half layout with one position per
token (each token is its own batch row, offset = its position), over the
inverse frequencies transformers computes (plain, ``linear`` or ``llama3``
scaling). Logits are computed only for the rows in ``logits_indices``, in
float32. The forward pass only builds MLX's lazy graph; the caller evaluates
it (logits and new caches together) once per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import numpy as np

from backends.metal.attention import KVCache, MetalAttention, MetalAttentionMetadata
from engine.model_config import ModelConfig
from engine.weights.canonical import expected_shapes

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def mlx_dtype(name: str) -> mx.Dtype:
    """The MLX dtype of a backend dtype name (``float32``, ``bfloat16`` or ``float16``)."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` float32, computed as transformers does."""
    dim = config.head_dim
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)       # [D/2]
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)  # [D/2]
    if rope_type == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32)
    try:
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
    except KeyError as e:
        raise ValueError(f"llama3 rope_scaling lacks {e.args[0]!r}") from e
    old_context_len = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq                                                 # [D/2]
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)       # [D/2]
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)  # [D/2]
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled                      # [D/2]
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)                   # [D/2]
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: mx.array, positions: mx.array, rope_periods: mx.array) -> mx.array:
    """Rotate ``x`` ``[T, heads, D]`` (rotate-half layout) by each token's position ``[T]`` int32.

    Each token is its own batch row of ``mx.fast.rope``, offset by its position;
    ``rope_periods`` ``[D/2]`` are ``1 / inv_freq``.
    """
    out = mx.fast.rope(x[:, :, None, :], x.shape[-1], traditional=False, base=None, scale=1.0,
                       offset=positions, freqs=rope_periods)                              # [T, heads, 1, D]
    return out[:, :, 0, :]                                                                 # [T, heads, D]


@dataclass
class LayerWeights:
    """One decoder layer, fused and in the model dtype (``[out, in]`` layout)."""

    input_norm: mx.array              # [hidden]
    qkv: mx.array                     # [(H + 2*Hkv) * D, hidden]
    qkv_bias: mx.array | None         # [(H + 2*Hkv) * D] (attention_bias only)
    o_proj: mx.array                  # [hidden, H * D]
    post_norm: mx.array               # [hidden]
    gate_up: mx.array                 # [2 * intermediate, hidden]
    down: mx.array                    # [hidden, intermediate]


def load_weights(config: ModelConfig, weights: dict[str, np.ndarray], dtype: mx.Dtype):
    """Check ``weights`` against the canonical shapes and fuse them into MLX arrays.

    Returns ``(embed, layers, final_norm, lm_head)``; ``lm_head`` is ``embed``
    itself when the embeddings are tied. Raises ``ValueError`` naming the first
    missing or mis-shaped tensor.
    """
    shapes = expected_shapes(config)
    if "lm_head.weight" in weights and "lm_head.weight" not in shapes:
        shapes = {**shapes, "lm_head.weight": (config.vocab_size, config.hidden_size)}

    def get(name: str) -> np.ndarray:
        if name not in weights:
            raise ValueError(f"weight {name!r} is missing")
        array = np.asarray(weights[name])
        if tuple(array.shape) != shapes[name]:
            raise ValueError(f"weight {name!r} has shape {tuple(array.shape)}, expected {shapes[name]}")
        return array

    def to_mx(*arrays: np.ndarray) -> mx.array:
        joined = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        return mx.array(np.ascontiguousarray(joined, dtype=np.float32)).astype(dtype)

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        qkv_bias = None
        if config.attention_bias:
            qkv_bias = to_mx(*(get(f"{attn}{x}_proj.bias") for x in "qkv"))               # [(H + 2*Hkv) * D]
        layers.append(LayerWeights(
            input_norm=to_mx(get(p + "input_layernorm.weight")),
            qkv=to_mx(*(get(f"{attn}{x}_proj.weight") for x in "qkv")),                  # [(H + 2*Hkv) * D, hidden]
            qkv_bias=qkv_bias,
            o_proj=to_mx(get(attn + "o_proj.weight")),
            post_norm=to_mx(get(p + "post_attention_layernorm.weight")),
            gate_up=to_mx(get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")),  # [2 * inter, hidden]
            down=to_mx(get(p + "mlp.down_proj.weight")),
        ))
    embed = to_mx(get("model.embed_tokens.weight"))                                       # [vocab, hidden]
    lm_head = embed
    if "lm_head.weight" in weights and not config.tie_word_embeddings:
        lm_head = to_mx(get("lm_head.weight"))                                            # [vocab, hidden]
    final_norm = to_mx(get("model.norm.weight"))
    mx.eval(embed, lm_head, final_norm, [vars(layer) for layer in layers])
    return embed, layers, final_norm, lm_head


def linear(x: mx.array, w: mx.array, bias: mx.array | None = None) -> mx.array:
    """``x @ w.T (+ bias)``: ``x [T, in]``, ``w [out, in]`` → ``[T, out]``."""
    if bias is None:
        return x @ w.T                                                                    # [T, out]
    return mx.addmm(bias, x, w.T)                                                         # [T, out]


class MLXLlamaModel:
    """Decoder weights plus the forward pass; holds no per-step state."""

    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray], dtype: mx.Dtype = mx.float32) -> None:
        self.config = config
        self.dtype = dtype
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.embed, self.layers, self.final_norm, self.lm_head = load_weights(config, weights, dtype)
        # mx.fast.rope takes the periods 1 / inv_freq.
        self.rope_periods = mx.array(1.0 / rope_inv_freq(config))                         # [D/2] float32
        # Built on the caller's thread, stepped on the engine's: MLX streams are per
        # thread, so nothing lazy may cross (the weights are evaluated by load_weights).
        mx.eval(self.rope_periods)
        self.attention = MetalAttention(self.num_heads, self.num_kv_heads, self.head_dim)

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
        new_caches = []
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, kv_cache = self._layer(layer, x, positions, kv_cache, metadata)              # [T, hidden]
            new_caches.append(kv_cache)
        x = x[logits_indices]                                                              # [N, hidden]
        x = mx.fast.rms_norm(x, self.final_norm, self.config.rms_norm_eps)                 # [N, hidden]
        return linear(x, self.lm_head).astype(mx.float32), new_caches                      # [N, vocab]

    def _layer(self, w: LayerWeights, x: mx.array, positions: mx.array, kv_cache: KVCache,
               metadata: MetalAttentionMetadata) -> tuple[mx.array, KVCache]:
        num_tokens = x.shape[0]
        h_q, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        eps = self.config.rms_norm_eps

        h = mx.fast.rms_norm(x, w.input_norm, eps)                                         # [T, hidden]
        qkv = linear(h, w.qkv, w.qkv_bias)                                                 # [T, (H + 2*Hkv) * D]
        qk = qkv[:, : (h_q + h_kv) * d].reshape(num_tokens, h_q + h_kv, d)                 # [T, H + Hkv, D]
        qk = apply_rope(qk, positions, self.rope_periods)                                  # [T, H + Hkv, D]
        q = qk[:, :h_q]                                                                    # [T, H, D]
        k = qk[:, h_q:]                                                                    # [T, Hkv, D]
        v = qkv[:, (h_q + h_kv) * d:].reshape(num_tokens, h_kv, d)                         # [T, Hkv, D]
        attn, kv_cache = self.attention.forward(q, k, v, kv_cache, metadata)               # [T, H, D]
        x = x + linear(attn.reshape(num_tokens, h_q * d), w.o_proj)                        # [T, hidden]

        h = mx.fast.rms_norm(x, w.post_norm, eps)                                          # [T, hidden]
        gate, up = mx.split(linear(h, w.gate_up), 2, axis=-1)                              # [T, inter] each
        return x + linear(gate * mx.sigmoid(gate) * up, w.down), kv_cache                  # [T, hidden]
