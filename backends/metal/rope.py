"""Rotary position embedding in MLX, per layer as ``ModelConfig.layer_rope`` says.

The inverse frequencies are computed in numpy exactly as transformers does
(plain, ``linear``, ``llama3``; ``longrope`` with its short and long factor
sets). Plain rotaries run ``mx.fast.rope`` in the rotate-half layout, one
position per token (each token is its own batch row, offset = its position),
rotating the first ``rotary_dim`` dims; LongRoPE picks each token's factor
set by its request's context length (as transformers picks per forward pass)
and scales cos/sin by its attention factor, computed explicitly like
``backends.torch_model.rope``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from model.config import ModelConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def _rope_type(scaling: dict | None) -> str:
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return rope_type


def rope_inv_freq(config: ModelConfig, theta: float | None = None, scaling: dict | None = None) -> np.ndarray:
    """Inverse frequencies ``[rotary_dim // 2]`` float32, computed as transformers does (not longrope)."""
    dim = config.rotary_dim
    if theta is None:
        theta, scaling = config.rope_theta, config.rope_scaling
    scaling = scaling or {}
    rope_type = _rope_type(scaling)
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)       # [D/2]
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)       # [D/2]
    if rope_type == "default":
        return inv_freq
    if rope_type == "longrope":
        raise ValueError("longrope frequencies depend on the context: use MLXRotary.of")
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
    ``rope_periods`` ``[R/2]`` are ``1 / inv_freq`` (the first ``R`` dims rotate).
    """
    out = mx.fast.rope(x[:, :, None, :], 2 * rope_periods.shape[0], traditional=False, base=None, scale=1.0,
                       offset=positions, freqs=rope_periods)                              # [T, heads, 1, D]
    return out[:, :, 0, :]                                                                 # [T, heads, D]


@dataclass
class MLXRotary:
    """One rotary embedding (what the layers with the same base and scaling share)."""

    periods: mx.array | None          # [R/2] 1 / inv_freq for mx.fast.rope (plain kinds); None for longrope
    short_inv_freq: mx.array | None   # [R/2] longrope's short factors' inverse frequencies
    long_inv_freq: mx.array | None    # [R/2] longrope's long factors' ones
    original_max_positions: int       # longrope: a request longer than this uses the long set
    attention_factor: float           # longrope: cos/sin scale

    @classmethod
    def of(cls, config: ModelConfig, layer: int) -> "MLXRotary":
        theta, scaling = config.layer_rope(layer)
        if _rope_type(scaling) != "longrope":
            return cls(mx.array(1.0 / rope_inv_freq(config, theta, scaling)), None, None, 0, 1.0)
        dim = config.rotary_dim
        original = int(scaling["original_max_position_embeddings"])
        factor = scaling.get("factor") or config.max_position_embeddings / original
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        shape = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)       # [R/2]

        def inv(factors) -> mx.array:
            return mx.array((np.float32(1.0) / (np.asarray(factors, dtype=np.float32)
                                                * (np.float32(theta) ** shape))).astype(np.float32))

        return cls(None, inv(scaling["short_factor"]), inv(scaling["long_factor"]), original, float(attention_factor))

    def arrays(self) -> list[mx.array]:
        """Its arrays (to evaluate on the thread that built them)."""
        return [a for a in (self.periods, self.short_inv_freq, self.long_inv_freq) if a is not None]

    def apply(self, x: mx.array, positions: mx.array, context_lens: mx.array | None) -> mx.array:
        """Rotate ``x`` ``[T, heads, D]``; ``context_lens`` ``[T]`` (each token's request's) for longrope."""
        if self.periods is not None:
            return apply_rope(x, positions, self.periods)
        is_long = (context_lens > self.original_max_positions)[:, None]                  # [T, 1]
        inv = mx.where(is_long, self.long_inv_freq[None, :], self.short_inv_freq[None, :])  # [T, R/2]
        freqs = positions.astype(mx.float32)[:, None] * inv                              # [T, R/2]
        cos = (mx.cos(freqs) * self.attention_factor).astype(x.dtype)[:, None, :]        # [T, 1, R/2]
        sin = (mx.sin(freqs) * self.attention_factor).astype(x.dtype)[:, None, :]        # [T, 1, R/2]
        half = inv.shape[-1]
        x1, x2 = x[..., :half], x[..., half: 2 * half]                                   # [T, heads, R/2] each
        return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half:]], axis=-1)  # [T, heads, D]
