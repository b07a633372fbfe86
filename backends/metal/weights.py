"""The metal model's weights: canonical numpy / quantized tensors to fused MLX arrays, one tensor at a time.

Dense weights go straight to the compute dtype (``mx.array(values,
dtype=...)``: no float32 MLX copy) and each tensor is evaluated as it is
made, so the float32 numpy input and one tensor's MLX copy are all that is
alive besides what is already loaded: peak MLX memory while loading stays
within the final weights plus the largest tensor in the compute dtype.

Quantized weights (``model.weights.quant.QuantizedTensor``: GGUF Q4_0, Q4_1,
Q8_0, K-quants, MLX affine checkpoints) stay packed as ``QuantizedWeight``:
every projection is one ``mx.quantized_matmul`` (affine, the tensor's group
size and bits, ``transpose=True``), the token embedding gathers the packed
rows of the step's tokens (``mx.take``) and dequantizes just those rows, and
a tied LM head is the same packed table through ``mx.quantized_matmul``.
Scales and biases are held in the compute dtype where that holds them
exactly (a GGUF Q4_0/Q4_1/Q8_0 scale is a float16 itself, so float16 compute
keeps it as is), else in float32, never rounded; MLX then multiplies in
float32 and ``linear`` casts the result back to the compute dtype. Fused
projections whose parts have different layouts (a Q4_K ``q_proj`` next to a
Q6_K ``v_proj``) are re-laid out losslessly to one (``concat_rows``); a fused
projection with a float part is dequantized. Norms, biases and the stacked
MoE experts (the readers never quantize 3-D tensors) stay floating point.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from model.config import ModelConfig
from model.weights.quant import QuantizedTensor, backend_weight_shapes, checked_weight, concat_rows


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight ``[out, in]`` kept in MLX's affine layout (``model.weights.quant``), on the device."""

    codes: mx.array          # uint32 [out, in * bits / 32]
    scales: mx.array         # [out, in / group_size]: the compute dtype where exact, else float32
    biases: mx.array         # like scales; w = scales * q + biases
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 32 // self.bits

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self.biases.nbytes

    def arrays(self) -> list[mx.array]:
        return [self.codes, self.scales, self.biases]


Weight = mx.array | QuantizedWeight


@dataclass
class LayerWeights:
    """One decoder layer, fused and in the model dtype (``[out, in]`` layout; norms offset)."""

    input_norm: mx.array                    # [hidden]
    qkv: Weight                             # [(H + 2*Hkv) * D, hidden]
    qkv_bias: mx.array | None               # [(H + 2*Hkv) * D] (attention_bias only)
    o_proj: Weight                          # [hidden, H * D]
    post_norm: mx.array                     # [hidden]: the pre-MLP norm
    gate_up: Weight | None = None           # [2 * intermediate, hidden] (dense layers)
    down: Weight | None = None              # [hidden, intermediate] (dense layers)
    q_norm: mx.array | None = None          # [D] (qk_norm)
    k_norm: mx.array | None = None          # [D] (qk_norm)
    attn_out_norm: mx.array | None = None   # [hidden] (sandwich_norms)
    mlp_out_norm: mx.array | None = None    # [hidden] (sandwich_norms)
    router: Weight | None = None            # [E, hidden] (MoE layers)
    experts_gate_up: mx.array | None = None  # [E, hidden, 2 * I]: transposed for gather_mm
    experts_down: mx.array | None = None    # [E, I, hidden]: transposed for gather_mm
    shared_gate_up: Weight | None = None    # [2 * S, hidden] (a shared expert)
    shared_down: Weight | None = None       # [hidden, S]
    shared_gate: Weight | None = None       # [1, hidden]


def linear(x: mx.array, w: Weight, bias: mx.array | None = None) -> mx.array:
    """``x @ w.T (+ bias)``: ``x [T, in]``, ``w [out, in]`` (dense or packed) → ``[T, out]`` in ``x``'s dtype."""
    if isinstance(w, QuantizedWeight):
        out = mx.quantized_matmul(x, w.codes, w.scales, w.biases, transpose=True, group_size=w.group_size,
                                  bits=w.bits)                                            # [T, out]
        if out.dtype != x.dtype:
            out = out.astype(x.dtype)
        return out if bias is None else out + bias
    if bias is None:
        return x @ w.T                                                                    # [T, out]
    return mx.addmm(bias, x, w.T)                                                         # [T, out]


def embedding(table: Weight, ids: mx.array, dtype: mx.Dtype) -> mx.array:
    """The rows ``ids [T]`` of ``table [vocab, hidden]`` in ``dtype``; a packed table dequantizes only them.

    Packed rows are dequantized in float32 (exact, ``scales * q + biases`` as
    ``QuantizedTensor.dequantize``) and rounded to ``dtype`` once.
    """
    if isinstance(table, QuantizedWeight):
        scales = mx.take(table.scales, ids, axis=0).astype(mx.float32)                    # [T, hidden / group]
        biases = mx.take(table.biases, ids, axis=0).astype(mx.float32)
        rows = mx.dequantize(mx.take(table.codes, ids, axis=0), scales, biases, group_size=table.group_size,
                             bits=table.bits)                                             # [T, hidden] float32
        return rows.astype(dtype)                                                         # [T, hidden]
    return table[ids]                                                                     # [T, hidden]


def weight_arrays(weights: list) -> list[mx.array]:
    """The distinct MLX arrays of ``weights`` (arrays, ``QuantizedWeight`` values, ``LayerWeights``, None)."""
    seen: dict[int, mx.array] = {}
    for w in weights:
        parts = vars(w).values() if isinstance(w, LayerWeights) else [w]
        for part in parts:
            for a in part.arrays() if isinstance(part, QuantizedWeight) else [part]:
                if isinstance(a, mx.array):
                    seen.setdefault(id(a), a)
    return list(seen.values())


def load_weights(config: ModelConfig, weights: dict, dtype: mx.Dtype):
    """Check ``weights`` against the canonical shapes and fuse them into MLX arrays, one evaluated tensor at a time.

    ``weights`` maps canonical names to float numpy arrays or
    ``QuantizedTensor`` values. Returns ``(embed, layers, final_norm,
    lm_head)``; ``lm_head`` is ``embed`` itself when the embeddings are tied.
    Norm weights get the family's ``norm_weight_offset`` (Gemma's
    ``1 + weight``) in float32 and stay float32 for ``norm_in_float32``
    families. Raises ``ValueError`` naming the first missing or mis-shaped tensor.
    """
    shapes = backend_weight_shapes(config, weights)
    traits = config.traits
    norm_dtype = mx.float32 if traits.norm_in_float32 else dtype

    def get(name: str) -> np.ndarray | QuantizedTensor:
        return checked_weight(weights, shapes, name)

    def dense(*names: str, axis: int = 0, transpose: bool = False) -> mx.array:
        arrays = [_values(get(n)) for n in names]
        joined = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=axis)
        if transpose:
            joined = np.swapaxes(joined, -1, -2)
        return _evaluated(mx.array(np.ascontiguousarray(joined, dtype=np.float32), dtype=dtype))

    def proj(*names: str) -> Weight:
        """A projection (``names`` fused along ``out``): packed when every part is quantized."""
        parts = [get(n) for n in names]
        if not all(isinstance(p, QuantizedTensor) for p in parts):
            return dense(*names)
        return _device_quantized(parts[0] if len(parts) == 1 else concat_rows(parts), dtype)

    def norm(name: str) -> mx.array | None:
        if name not in shapes:
            return None
        offset = np.float32(traits.norm_weight_offset)
        return _evaluated(mx.array(_values(get(name)) + offset, dtype=norm_dtype))

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        sandwich = traits.sandwich_norms
        layer = LayerWeights(
            input_norm=norm(p + "input_layernorm.weight"),
            qkv=proj(*(f"{attn}{x}_proj.weight" for x in "qkv")),                       # [(H + 2*Hkv) * D, hidden]
            qkv_bias=dense(*(f"{attn}{x}_proj.bias" for x in "qkv")) if config.attention_bias else None,
            o_proj=proj(attn + "o_proj.weight"),
            post_norm=norm(p + ("pre_feedforward_layernorm.weight" if sandwich else "post_attention_layernorm.weight")),
            q_norm=norm(attn + "q_norm.weight"),
            k_norm=norm(attn + "k_norm.weight"),
            attn_out_norm=norm(p + "post_attention_layernorm.weight") if sandwich else None,
            mlp_out_norm=norm(p + "post_feedforward_layernorm.weight"),
        )
        if config.is_moe_layer(i):
            layer.router = proj(mlp + "gate.weight")                                      # [E, hidden]
            layer.experts_gate_up = dense(mlp + "experts.gate_proj.weight", mlp + "experts.up_proj.weight",
                                          axis=1, transpose=True)                         # [E, hidden, 2I]
            layer.experts_down = dense(mlp + "experts.down_proj.weight", transpose=True)  # [E, I, hidden]
            if config.shared_expert_intermediate_size:
                s = mlp + "shared_expert."
                layer.shared_gate_up = proj(s + "gate_proj.weight", s + "up_proj.weight")  # [2S, hidden]
                layer.shared_down = proj(s + "down_proj.weight")
                layer.shared_gate = proj(mlp + "shared_expert_gate.weight")               # [1, hidden]
        else:
            layer.gate_up = proj(mlp + "gate_proj.weight", mlp + "up_proj.weight")        # [2 * inter, hidden]
            layer.down = proj(mlp + "down_proj.weight")
        layers.append(layer)
    embed = proj("model.embed_tokens.weight")                                             # [vocab, hidden]
    lm_head = embed
    if "lm_head.weight" in weights and not config.tie_word_embeddings:
        lm_head = proj("lm_head.weight")                                                  # [vocab, hidden]
    final_norm = norm("model.norm.weight")
    return embed, layers, final_norm, lm_head


def _values(tensor: np.ndarray | QuantizedTensor) -> np.ndarray:
    """The float32 values of a tensor (a quantized one dequantized: a fused projection with a float part)."""
    return tensor.dequantize() if isinstance(tensor, QuantizedTensor) else tensor


def _evaluated(array: mx.array) -> mx.array:
    mx.eval(array)
    return array


def _device_quantized(tensor: QuantizedTensor, dtype: mx.Dtype) -> QuantizedWeight:
    """``tensor`` on the device, its scales and biases in ``dtype`` if that holds both exactly, else float32."""
    scale_dtype = dtype if _exact_in(tensor.scales, dtype) and _exact_in(tensor.biases, dtype) else mx.float32
    weight = QuantizedWeight(mx.array(tensor.codes), mx.array(tensor.scales, dtype=scale_dtype),
                             mx.array(tensor.biases, dtype=scale_dtype), tensor.bits, tensor.group_size)
    mx.eval(weight.arrays())
    return weight


def _exact_in(values: np.ndarray, dtype: mx.Dtype) -> bool:
    """Whether every element of ``values`` is exactly representable in ``dtype``."""
    if dtype == mx.float32 or (dtype == mx.float16 and values.dtype == np.float16):
        return True
    wide = values.astype(np.float32)
    back = np.array(mx.array(wide, dtype=dtype).astype(mx.float32))
    return bool(np.array_equal(back, wide))
