"""Rotary position embedding (RoPE) in the Hugging Face rotate-half layout.

The inverse frequencies are computed exactly as transformers does (float32,
same operation order), so cos/sin match HF bit for bit. Supported
``rope_scaling`` types: None / ``default`` (plain), ``linear``, ``llama3`` and
``longrope`` (Phi-3: short or long factors per request, chosen by its
context length as transformers chooses per forward pass, and an attention
factor on cos/sin). Each layer's rotary comes from ``ModelConfig.layer_rope``
(Gemma 3's sliding layers have a base of their own); only the first
``rotary_dim`` dims of a head rotate (partial rotary), the rest pass.

Layout: the rotated dims ``R`` are split into halves ``x1 = x[..., :R/2]``
and ``x2 = x[..., R/2:R]``; the rotation is::

    out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., R:]]

which equals HF's ``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model.config import ModelConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def rope_type_of(rope_scaling: dict | None) -> str:
    """The rope type named by an HF ``rope_scaling`` dict (``default`` when None)."""
    if not rope_scaling:
        return "default"
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return rope_type


@dataclass(frozen=True)
class Rotary:
    """One rotary embedding: what a layer (or several sharing it) rotates q and k by."""

    inv_freq: torch.Tensor                  # [R/2] float32 (longrope: the short factors')
    long_inv_freq: torch.Tensor | None      # [R/2] float32: longrope's long factors, else None
    original_max_positions: int             # longrope: a request longer than this uses long_inv_freq
    attention_factor: float                 # cos and sin are multiplied by it (longrope), else 1.0
    rotary_dim: int                         # R: leading dims of a head that rotate

    def to(self, device: torch.device | str) -> "Rotary":
        long = None if self.long_inv_freq is None else self.long_inv_freq.to(device)
        return Rotary(self.inv_freq.to(device), long, self.original_max_positions, self.attention_factor,
                      self.rotary_dim)


def rotary_for(config: ModelConfig, layer: int = 0) -> Rotary:
    """The rotary embedding of ``layer`` (its base and scaling from ``config.layer_rope``)."""
    theta, scaling = config.layer_rope(layer)
    dim = config.rotary_dim
    if rope_type_of(scaling) != "longrope":
        return Rotary(compute_inv_freq(config, theta, scaling), None, 0, 1.0, dim)
    original = int(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor") or config.max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim                      # [R/2]

    def inv(factors) -> torch.Tensor:
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta ** shape)       # [R/2]

    return Rotary(inv(scaling["short_factor"]), inv(scaling["long_factor"]), original, float(attention_factor), dim)


def compute_inv_freq(config: ModelConfig, theta: float | None = None, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies ``[rotary_dim // 2]`` (float32) as transformers computes them.

    ``theta`` / ``scaling`` default to the config's (full-attention) ones.
    """
    dim = config.rotary_dim
    if theta is None:
        theta, scaling = config.rope_theta, config.rope_scaling
    base = float(theta)
    rope_type = rope_type_of(scaling)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim   # [D/2]
    inv_freq = 1.0 / (base ** exponents)                                                  # [D/2]
    if rope_type == "default":
        return inv_freq
    if rope_type == "longrope":
        raise ValueError("longrope frequencies depend on the context: use rotary_for")
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor                                                          # [D/2]
    return _llama3_inv_freq(inv_freq, scaling, factor, config.max_position_embeddings)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict, factor: float, max_positions: int) -> torch.Tensor:
    """Llama-3.1 frequency smoothing (``rope_type == "llama3"``)."""
    try:
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
    except KeyError as e:
        raise ValueError(f"llama3 rope_scaling lacks {e.args[0]!r}") from e
    old_context_len = scaling.get("original_max_position_embeddings", max_positions)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq                                                      # [D/2]
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)  # [D/2]
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)  # [D/2]
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama  # [D/2]
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)      # [D/2]
    return torch.where(is_medium_freq, smoothed, inv_freq_llama)                          # [D/2]


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype,
                 attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[T, 1, R/2]`` for ``positions`` ``[T]``; computed once per step.

    ``inv_freq`` is ``[R/2]``, or ``[T, R/2]`` when tokens differ (longrope).
    """
    inv = inv_freq if inv_freq.dim() == 2 else inv_freq[None, :]
    freqs = positions[:, None].float() * inv                  # [T, R/2]
    cos, sin = freqs.cos(), freqs.sin()                        # [T, R/2] each
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)   # [T, 1, R/2] each


def rotary_cos_sin(rotary: Rotary, positions: torch.Tensor, dtype: torch.dtype,
                   context_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[T, 1, R/2]`` of ``rotary``; longrope needs each token's request ``context_lens`` ``[T]``."""
    inv_freq = rotary.inv_freq
    if rotary.long_inv_freq is not None:
        if context_lens is None:
            raise ValueError("longrope needs the context length of each token's request")
        is_long = (context_lens > rotary.original_max_positions)[:, None]                # [T, 1]
        inv_freq = torch.where(is_long, rotary.long_inv_freq[None, :], rotary.inv_freq[None, :])  # [T, R/2]
    return rope_cos_sin(inv_freq, positions, dtype, rotary.attention_factor)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[T, H, D]`` by the per-token angles ``cos``/``sin`` ``[T, 1, R/2]`` (R <= D)."""
    half = cos.shape[-1]
    x1 = x[..., :half]                                         # [T, H, R/2]
    x2 = x[..., half: 2 * half]                                # [T, H, R/2]
    rotated = (x1 * cos - x2 * sin, x2 * cos + x1 * sin)
    if 2 * half == x.shape[-1]:
        return torch.cat(rotated, dim=-1)                      # [T, H, D]
    return torch.cat((*rotated, x[..., 2 * half:]), dim=-1)    # [T, H, D]
