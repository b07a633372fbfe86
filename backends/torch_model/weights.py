"""Turn canonical numpy weights into the fused torch tensors the model runs on.

Fusions done once at load (each saves a matmul launch per layer):

- ``q_proj``/``k_proj``/``v_proj`` → ``qkv``   ``[(H + 2*Hkv) * D, hidden]``
- ``gate_proj``/``up_proj``      → ``gate_up`` ``[2 * intermediate, hidden]`` (per expert too)

Norm weights get the family's ``norm_weight_offset`` added here (Gemma's
``1 + weight``), in float32; families that scale in float32
(``norm_in_float32``) keep them float32 in any model dtype. Weights keep the
``[out, in]`` layout of ``torch.nn.functional.linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.config import ModelConfig
from model.weights.canonical import expected_shapes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a backend dtype name (``float32`` or ``bfloat16``)."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass
class LayerWeights:
    """One decoder layer, fused and in the model dtype (norms offset; see the module docstring)."""

    input_norm: torch.Tensor                     # [hidden]
    qkv: torch.Tensor                            # [(H + 2*Hkv) * D, hidden]
    qkv_bias: torch.Tensor | None                # [(H + 2*Hkv) * D] (attention_bias only)
    o_proj: torch.Tensor                         # [hidden, H * D]
    post_norm: torch.Tensor                      # [hidden]: the pre-MLP norm
    gate_up: torch.Tensor | None                 # [2 * intermediate, hidden] (dense layers)
    down: torch.Tensor | None                    # [hidden, intermediate] (dense layers)
    q_norm: torch.Tensor | None = None           # [D] (qk_norm)
    k_norm: torch.Tensor | None = None           # [D] (qk_norm)
    attn_out_norm: torch.Tensor | None = None    # [hidden]: norm of the attention output (sandwich_norms)
    mlp_out_norm: torch.Tensor | None = None     # [hidden]: norm of the MLP output (sandwich_norms)
    router: torch.Tensor | None = None           # [E, hidden] (MoE layers)
    experts_gate_up: torch.Tensor | None = None  # [E, 2 * moe_intermediate, hidden]
    experts_down: torch.Tensor | None = None     # [E, hidden, moe_intermediate]
    shared_gate_up: torch.Tensor | None = None   # [2 * shared_intermediate, hidden] (a shared expert)
    shared_down: torch.Tensor | None = None      # [hidden, shared_intermediate]
    shared_gate: torch.Tensor | None = None      # [1, hidden]: the shared expert's sigmoid gate


@dataclass
class ModelWeights:
    """All weights of a model."""

    embed: torch.Tensor               # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: torch.Tensor          # [hidden]
    lm_head: torch.Tensor             # [vocab, hidden] (the embedding itself when tied)


def load_weights(config: ModelConfig, weights: dict[str, np.ndarray], dtype: torch.dtype) -> ModelWeights:
    """Check names and shapes of ``weights`` against ``config`` and fuse them.

    Raises ``ValueError`` naming the first missing or mis-shaped tensor.
    """
    shapes = expected_shapes(config)
    if "lm_head.weight" in weights and not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    traits = config.traits
    norm_dtype = torch.float32 if traits.norm_in_float32 else dtype

    def get(name: str) -> torch.Tensor:
        if name not in weights:
            raise ValueError(f"weight {name!r} is missing")
        array = np.asarray(weights[name])
        if tuple(array.shape) != shapes[name]:
            raise ValueError(f"weight {name!r} has shape {tuple(array.shape)}, expected {shapes[name]}")
        return torch.from_numpy(np.ascontiguousarray(array))

    def cast(*names: str, dim: int = 0) -> torch.Tensor:
        parts = [get(n) for n in names]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)).to(dtype).contiguous()

    def norm(name: str) -> torch.Tensor | None:
        if name not in shapes:
            return None
        return (get(name).float() + traits.norm_weight_offset).to(norm_dtype).contiguous()   # [n]

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        sandwich = traits.sandwich_norms
        layer = LayerWeights(
            input_norm=norm(p + "input_layernorm.weight"),
            qkv=cast(*(f"{attn}{x}_proj.weight" for x in "qkv")),                      # [(H + 2*Hkv) * D, hidden]
            qkv_bias=cast(*(f"{attn}{x}_proj.bias" for x in "qkv")) if config.attention_bias else None,
            o_proj=cast(attn + "o_proj.weight"),
            post_norm=norm(p + ("pre_feedforward_layernorm.weight" if sandwich else "post_attention_layernorm.weight")),
            gate_up=None,
            down=None,
            q_norm=norm(attn + "q_norm.weight"),
            k_norm=norm(attn + "k_norm.weight"),
            attn_out_norm=norm(p + "post_attention_layernorm.weight") if sandwich else None,
            mlp_out_norm=norm(p + "post_feedforward_layernorm.weight"),
        )
        if config.is_moe_layer(i):
            layer.router = cast(mlp + "gate.weight")                                     # [E, hidden]
            layer.experts_gate_up = cast(mlp + "experts.gate_proj.weight", mlp + "experts.up_proj.weight", dim=1)
            layer.experts_down = cast(mlp + "experts.down_proj.weight")                  # [E, hidden, I]
            if config.shared_expert_intermediate_size:
                s = mlp + "shared_expert."
                layer.shared_gate_up = cast(s + "gate_proj.weight", s + "up_proj.weight")  # [2 * S, hidden]
                layer.shared_down = cast(s + "down_proj.weight")
                layer.shared_gate = cast(mlp + "shared_expert_gate.weight")              # [1, hidden]
        else:
            layer.gate_up = cast(mlp + "gate_proj.weight", mlp + "up_proj.weight")       # [2 * inter, hidden]
            layer.down = cast(mlp + "down_proj.weight")
        layers.append(layer)

    embed = cast("model.embed_tokens.weight")                                            # [vocab, hidden]
    tied = config.tie_word_embeddings or "lm_head.weight" not in weights
    return ModelWeights(
        embed=embed,
        layers=layers,
        final_norm=norm("model.norm.weight"),
        lm_head=embed if tied else cast("lm_head.weight"),                                # [vocab, hidden]
    )
