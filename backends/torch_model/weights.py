"""Turn canonical numpy weights into the fused torch tensors the model runs on.

Fusions done once at load (each saves a matmul launch per layer):

- ``q_proj``/``k_proj``/``v_proj`` → ``qkv``   ``[(H + 2*Hkv) * D, hidden]``
- ``gate_proj``/``up_proj``      → ``gate_up`` ``[2 * intermediate, hidden]`` (per expert too)

Norm weights get the family's ``norm_weight_offset`` added here (Gemma's
``1 + weight``), in float32; families that scale in float32
(``norm_in_float32``) keep them float32 in any model dtype. Weights keep the
``[out, in]`` layout of ``torch.nn.functional.linear``.

Group-quantized inputs (``model.weights.quant.QuantizedTensor``) are
dequantized to float32 first by default, exactly as ``dequantize_all`` does,
so the cpu backend (the float32 oracle) runs the same numbers either way.
A backend with quantized kernels passes ``keep_quantized`` (the code widths
its kernels take; the cuda backend: 4 and 8): then the 2-D projections
(qkv, o_proj, gate_up, down, the shared expert's, the LM head and the
embedding) stay packed as ``QuantWeight``. Fused projections concatenate
the packed rows (``quant.concat_rows``: the widest code and smallest group
of the parts, lossless); other widths are re-laid out losslessly to the
narrowest supported one that holds them (3, 5, 6 bits -> 8, 2 -> 4). What
stays floating point: norms, biases, the MoE router and shared-expert gate
(tiny), the stacked experts (the readers never quantize 3-D tensors), and a
fused projection whose parts are not all quantized (its quantized parts are
dequantized). Scales and biases keep their float16 / float32 values
exactly; float32 ones that bfloat16 holds exactly (MLX checkpoints saved in
bfloat16) are stored as bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.config import ModelConfig
from model.weights.quant import QuantizedTensor, backend_weight_shapes, checked_weight, concat_rows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a backend dtype name (``float32`` or ``bfloat16``)."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass
class QuantWeight:
    """A weight ``W [out, in]`` kept group-quantized (the affine layout of ``model.weights.quant``), in torch.

    ``W[r, k] = scales[r, k // group_size] * q[r, k] + biases[r, k // group_size]``;
    ``dtype`` is the compute dtype the weight is used at (what a dequantized
    copy or a GEMM's output has), so code that asks a weight for its
    ``dtype`` / ``device`` treats packed and plain weights alike.
    """

    codes: torch.Tensor           # int32 [out, in * bits / 32]: each row a little-endian stream of codes
    scales: torch.Tensor          # float16 | bfloat16 | float32 [out, in / group_size]
    biases: torch.Tensor          # same shape and dtype as scales
    bits: int                     # bits per code
    group_size: int               # consecutive input values sharing one scale and bias
    dtype: torch.dtype            # the model's compute dtype

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the dequantized weight."""
        return self.codes.shape[0], self.codes.shape[1] * 32 // self.bits

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales and biases."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.biases))

    def to(self, device: torch.device | str) -> "QuantWeight":
        """This weight with its tensors on ``device``."""
        return QuantWeight(self.codes.to(device), self.scales.to(device), self.biases.to(device), self.bits,
                           self.group_size, self.dtype)


def quant_weight(tensor: QuantizedTensor, dtype: torch.dtype, bits: tuple[int, ...]) -> QuantWeight | None:
    """``tensor`` as a ``QuantWeight`` of one of the code widths ``bits`` (re-laid out losslessly), or None.

    None when no width in ``bits`` holds ``tensor``'s codes.
    """
    wider = [b for b in sorted(bits) if b >= tensor.bits]
    if not wider:
        return None
    tensor = tensor.relayout(wider[0], tensor.group_size)
    codes = torch.from_numpy(np.ascontiguousarray(tensor.codes).view(np.int32))          # [out, in * bits / 32]
    scales, biases = (torch.from_numpy(np.ascontiguousarray(t)) for t in (tensor.scales, tensor.biases))
    if scales.dtype == torch.float32:
        narrow_s, narrow_b = scales.to(torch.bfloat16), biases.to(torch.bfloat16)
        if torch.equal(narrow_s.float(), scales) and torch.equal(narrow_b.float(), biases):
            scales, biases = narrow_s, narrow_b                                            # lossless
    return QuantWeight(codes, scales, biases, tensor.bits, tensor.group_size, dtype)


@dataclass
class LayerWeights:
    """One decoder layer, fused and in the model dtype (norms offset; see the module docstring).

    With ``load_weights(keep_quantized=...)`` the 2-D projections may be ``QuantWeight``.
    """

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

    embed: torch.Tensor | QuantWeight     # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: torch.Tensor              # [hidden]
    lm_head: torch.Tensor | QuantWeight   # [vocab, hidden] (the embedding itself when tied)


def load_weights(config: ModelConfig, weights: dict, dtype: torch.dtype,
                 keep_quantized: tuple[int, ...] = ()) -> ModelWeights:
    """Check names and shapes of ``weights`` against ``config`` and fuse them.

    ``weights`` maps canonical names to numpy arrays or ``QuantizedTensor``;
    ``keep_quantized``: the code widths kept packed (see the module
    docstring); empty: everything dequantized to float32 first.
    Raises ``ValueError`` naming the first missing or mis-shaped tensor.
    """
    shapes = backend_weight_shapes(config, weights)
    traits = config.traits
    norm_dtype = torch.float32 if traits.norm_in_float32 else dtype

    def raw(name: str) -> np.ndarray | QuantizedTensor:
        return checked_weight(weights, shapes, name)

    def get(name: str) -> torch.Tensor:
        value = raw(name)
        array = value.dequantize() if isinstance(value, QuantizedTensor) else value
        return torch.from_numpy(np.ascontiguousarray(array))

    def cast(*names: str, dim: int = 0) -> torch.Tensor:
        parts = [get(n) for n in names]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)).to(dtype).contiguous()

    def packed(*names: str) -> torch.Tensor | QuantWeight:
        """A projection (``names`` fused along ``out``): packed when every part is quantized and fits."""
        parts = [raw(n) for n in names]
        if keep_quantized and all(isinstance(p, QuantizedTensor) for p in parts):
            weight = quant_weight(parts[0] if len(parts) == 1 else concat_rows(parts), dtype, keep_quantized)
            if weight is not None:
                return weight
        return cast(*names)

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
            qkv=packed(*(f"{attn}{x}_proj.weight" for x in "qkv")),                    # [(H + 2*Hkv) * D, hidden]
            qkv_bias=cast(*(f"{attn}{x}_proj.bias" for x in "qkv")) if config.attention_bias else None,
            o_proj=packed(attn + "o_proj.weight"),
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
                layer.shared_gate_up = packed(s + "gate_proj.weight", s + "up_proj.weight")  # [2 * S, hidden]
                layer.shared_down = packed(s + "down_proj.weight")
                layer.shared_gate = cast(mlp + "shared_expert_gate.weight")              # [1, hidden]
        else:
            layer.gate_up = packed(mlp + "gate_proj.weight", mlp + "up_proj.weight")     # [2 * inter, hidden]
            layer.down = packed(mlp + "down_proj.weight")
        layers.append(layer)

    embed = packed("model.embed_tokens.weight")                                          # [vocab, hidden]
    tied = config.tie_word_embeddings or "lm_head.weight" not in weights
    return ModelWeights(
        embed=embed,
        layers=layers,
        final_norm=norm("model.norm.weight"),
        lm_head=embed if tied else packed("lm_head.weight"),                              # [vocab, hidden]
    )
