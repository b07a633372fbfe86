"""The canonical weight names and shapes a ``ModelConfig`` implies.

Both readers end by calling ``check_weights`` so that a backend can trust the
dict it is given: every expected tensor present, float32, C-contiguous and of
the right shape, and nothing else.
"""

from __future__ import annotations

import numpy as np

from model.config import ModelConfig


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape for every tensor of ``config``'s model (see ``model.config``)."""
    hidden, vocab = config.hidden_size, config.vocab_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    traits = config.traits
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        if traits.sandwich_norms:
            shapes[p + "pre_feedforward_layernorm.weight"] = (hidden,)
            shapes[p + "post_feedforward_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (q_dim, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_dim, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_dim, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q_dim)
        if config.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_dim,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_dim,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_dim,)
        if traits.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (config.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (config.head_dim,)
        if config.is_moe_layer(i):
            shapes.update(_moe_shapes(config, p + "mlp."))
        else:
            shapes.update(_mlp_shapes(p + "mlp.", hidden, config.intermediate_size))
    return shapes


def _mlp_shapes(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    """A gated MLP's three projections under ``prefix``."""
    return {prefix + "gate_proj.weight": (inter, hidden), prefix + "up_proj.weight": (inter, hidden),
            prefix + "down_proj.weight": (hidden, inter)}


def _moe_shapes(config: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """Router, stacked experts and optional shared expert of one MoE layer under ``prefix``."""
    hidden, experts, inter = config.hidden_size, config.num_experts, config.moe_intermediate_size
    shapes = {
        prefix + "gate.weight": (experts, hidden),
        prefix + "experts.gate_proj.weight": (experts, inter, hidden),
        prefix + "experts.up_proj.weight": (experts, inter, hidden),
        prefix + "experts.down_proj.weight": (experts, hidden, inter),
    }
    if config.shared_expert_intermediate_size:
        shapes.update(_mlp_shapes(prefix + "shared_expert.", hidden, config.shared_expert_intermediate_size))
        shapes[prefix + "shared_expert_gate.weight"] = (1, hidden)
    return shapes


def check_weights(config: ModelConfig, weights: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Validate ``weights`` against ``config``; return them float32 and C-contiguous.

    Raises ValueError naming the missing, unexpected or misshapen tensors and
    the checkpoint ``source`` they came from.
    """
    shapes = expected_shapes(config)
    missing = sorted(set(shapes) - set(weights))
    extra = sorted(set(weights) - set(shapes))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if extra:
            parts.append(f"unexpected {_few(extra)}")
        raise ValueError(f"{source}: weights do not match the config ({'; '.join(parts)})")
    out = {}
    for name, shape in shapes.items():
        array = weights[name]
        if tuple(array.shape) != shape:
            raise ValueError(f"{source}: {name} has shape {tuple(array.shape)}, the config implies {shape}")
        out[name] = np.ascontiguousarray(array, dtype=np.float32)
    return out


def _few(names: list[str], limit: int = 5) -> str:
    """A short listing of names for an error message."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
