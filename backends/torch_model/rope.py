"""Rotary position embedding (RoPE) in the Hugging Face rotate-half layout.

The inverse frequencies are computed exactly as transformers does (float32,
same operation order), so cos/sin match HF bit for bit. Supported
``rope_scaling`` types: None / ``default`` (plain), ``linear`` and ``llama3``.

Layout: head dim ``D`` is split into halves ``x1 = x[..., :D/2]`` and
``x2 = x[..., D/2:]``; the rotation is::

    out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]

which equals HF's ``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)``.
"""

from __future__ import annotations

import math

import torch

from engine.model_config import ModelConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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


def compute_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (float32) as transformers computes them."""
    dim = config.head_dim
    base = float(config.rope_theta)
    rope_type = rope_type_of(config.rope_scaling)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim   # [D/2]
    inv_freq = 1.0 / (base ** exponents)                                                  # [D/2]
    if rope_type == "default":
        return inv_freq
    scaling = config.rope_scaling
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


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[T, 1, D/2]`` for ``positions`` ``[T]``; computed once per step."""
    freqs = positions[:, None].float() * inv_freq[None, :]    # [T, D/2]
    cos = freqs.cos().to(dtype).unsqueeze(1)                   # [T, 1, D/2]
    sin = freqs.sin().to(dtype).unsqueeze(1)                   # [T, 1, D/2]
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[T, H, D]`` by the per-token angles ``cos``/``sin`` ``[T, 1, D/2]``."""
    half = x.shape[-1] // 2
    x1 = x[..., :half]                                         # [T, H, D/2]
    x2 = x[..., half:]                                         # [T, H, D/2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)   # [T, H, D]
