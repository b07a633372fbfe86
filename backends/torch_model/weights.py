"""Turn canonical numpy weights into the fused torch tensors the model runs on.

Fusions done once at load (each saves a matmul launch per layer):

- ``q_proj``/``k_proj``/``v_proj`` → ``qkv``   ``[(H + 2*Hkv) * D, hidden]``
- ``gate_proj``/``up_proj``      → ``gate_up`` ``[2 * intermediate, hidden]``

Weights keep the ``[out, in]`` layout of ``torch.nn.functional.linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.model_config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a backend dtype name (``float32`` or ``bfloat16``)."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass
class LayerWeights:
    """One decoder layer, fused and in the model dtype."""

    input_norm: torch.Tensor          # [hidden]
    qkv: torch.Tensor                 # [(H + 2*Hkv) * D, hidden]
    qkv_bias: torch.Tensor | None     # [(H + 2*Hkv) * D] (attention_bias only)
    o_proj: torch.Tensor              # [hidden, H * D]
    post_norm: torch.Tensor           # [hidden]
    gate_up: torch.Tensor             # [2 * intermediate, hidden]
    down: torch.Tensor                # [hidden, intermediate]


@dataclass
class ModelWeights:
    """All weights of a Llama-family model."""

    embed: torch.Tensor               # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: torch.Tensor          # [hidden]
    lm_head: torch.Tensor             # [vocab, hidden] (the embedding itself when tied)


def load_weights(config: ModelConfig, weights: dict[str, np.ndarray], dtype: torch.dtype) -> ModelWeights:
    """Check names and shapes of ``weights`` against ``config`` and fuse them.

    Raises ``ValueError`` naming the first missing or mis-shaped tensor.
    """
    hidden = config.hidden_size
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    inter = config.intermediate_size

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in weights:
            raise ValueError(f"weight {name!r} is missing")
        array = np.asarray(weights[name])
        if tuple(array.shape) != shape:
            raise ValueError(f"weight {name!r} has shape {tuple(array.shape)}, expected {shape}")
        return torch.from_numpy(np.ascontiguousarray(array))

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).contiguous()

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        qkv = torch.cat([
            get(attn + "q_proj.weight", (q_rows, hidden)),
            get(attn + "k_proj.weight", (kv_rows, hidden)),
            get(attn + "v_proj.weight", (kv_rows, hidden)),
        ])                                                                  # [(H + 2*Hkv) * D, hidden]
        qkv_bias = None
        if config.attention_bias:
            qkv_bias = cast(torch.cat([
                get(attn + "q_proj.bias", (q_rows,)),
                get(attn + "k_proj.bias", (kv_rows,)),
                get(attn + "v_proj.bias", (kv_rows,)),
            ]))                                                             # [(H + 2*Hkv) * D]
        gate_up = torch.cat([
            get(p + "mlp.gate_proj.weight", (inter, hidden)),
            get(p + "mlp.up_proj.weight", (inter, hidden)),
        ])                                                                  # [2 * inter, hidden]
        layers.append(LayerWeights(
            input_norm=cast(get(p + "input_layernorm.weight", (hidden,))),
            qkv=cast(qkv),
            qkv_bias=qkv_bias,
            o_proj=cast(get(attn + "o_proj.weight", (hidden, q_rows))),
            post_norm=cast(get(p + "post_attention_layernorm.weight", (hidden,))),
            gate_up=cast(gate_up),
            down=cast(get(p + "mlp.down_proj.weight", (hidden, inter))),
        ))

    embed = cast(get("model.embed_tokens.weight", (config.vocab_size, hidden)))  # [vocab, hidden]
    if "lm_head.weight" in weights and not config.tie_word_embeddings:
        lm_head = cast(get("lm_head.weight", (config.vocab_size, hidden)))       # [vocab, hidden]
    else:
        lm_head = embed
    return ModelWeights(
        embed=embed,
        layers=layers,
        final_norm=cast(get("model.norm.weight", (hidden,))),
        lm_head=lm_head,
    )
