"""Read a GGUF file into float32 canonical weights (architectures: ``model.weights.gguf_arch``).

Three things separate a GGUF tensor from its Hugging Face counterpart:

1. names (``blk.3.attn_q.weight`` vs ``model.layers.3.self_attn.q_proj.weight``);
2. quantisation (Q4_1, Q8_0, ...), undone with ``gguf.quants.dequantize``;
3. llama.cpp's converter permutes the rows of Q and K of the ``llama``
   architecture from Hugging Face's rotate-half RoPE layout to the
   interleaved one (and adds one to Gemma's norms); ``unpermute_qk`` undoes it,
   exactly as transformers' GGUF loader does, so the arrays equal what
   ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` holds.

Dimensions need no reversal by hand: ``GGUFReader`` already exposes each
tensor with numpy (row-major) shape, i.e. ggml's ``ne`` reversed, which is the
Hugging Face ``[out_features, in_features]`` order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.config import ModelConfig
from model.weights import gguf_arch, gguf_quant
from model.weights.canonical import check_weights
from model.weights.quant import QuantizedTensor, check_quantized_weights

SUPPORTED_GGUF_ARCHITECTURES = gguf_arch.SUPPORTED
field = gguf_arch.field


@dataclass(frozen=True)
class GGUFCheckpoint:
    config: ModelConfig
    weights: dict[str, np.ndarray]
    max_model_len: int


def open_gguf(path: Path):
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped; ValueError if not GGUF)."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e}); pass a .gguf model or a Hugging Face directory") from None


def read_gguf(path: Path, keep_quantized: bool = False) -> GGUFCheckpoint:
    """Dequantise the whole file; raises ValueError for an unsupported architecture or tensor.

    With ``keep_quantized`` the matrices of the types ``model.weights.gguf_quant``
    packs stay quantized (``QuantizedTensor``); the rest is dequantised as usual.
    """
    reader = open_gguf(path)
    config = gguf_model_config(reader, path)
    gguf_arch.check_tensors(reader, config, path)          # names and shapes, before anything is dequantised
    weights: dict = {}
    for tensor in reader.tensors:
        name = canonical_name(tensor.name, path, config)
        packed = _packed(tensor, config) if keep_quantized else None
        weights[name] = _dequantize(tensor, path, config) if packed is None else packed
    check = check_quantized_weights if keep_quantized else check_weights
    return GGUFCheckpoint(config, check(config, weights, str(path)), config.max_position_embeddings)


def gguf_model_config(reader, path: Path) -> ModelConfig:
    """Build the ``ModelConfig`` from the file's ``{arch}.*`` and tokenizer metadata."""
    return gguf_arch.model_config(reader, path)


def canonical_name(gguf_name: str, path: Path, config: ModelConfig | None = None) -> str:
    """Map a llama.cpp tensor name to the canonical Hugging Face one."""
    return gguf_arch.canonical_name(gguf_name, path, config)


def _dequantize(tensor, path: Path, config: ModelConfig) -> np.ndarray:
    """One tensor as an owned float32 array in Hugging Face shape and layout."""
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(
            f"{path}: tensor {tensor.name} uses quantisation {tensor.tensor_type.name}, "
            f"which the gguf package cannot dequantise; use a file with another quantisation"
        ) from None
    hf_shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml ne is innermost-first
    values = gguf_arch.hf_values(_hf_rows(values.reshape(hf_shape), tensor.name, config), tensor.name, config)
    return np.array(values, dtype=np.float32, order="C")  # copy: never a view of the mmap


def _hf_rows(values: np.ndarray, gguf_name: str, config: ModelConfig) -> np.ndarray:
    """``values`` (a tensor's rows first) in Hugging Face row order."""
    if not gguf_arch.permutes_qk(config):
        return values
    if ".attn_q." in gguf_name:
        return unpermute_qk(values, config.num_attention_heads)
    if ".attn_k." in gguf_name:
        return unpermute_qk(values, config.num_key_value_heads)
    return values


def _packed(tensor, config: ModelConfig) -> QuantizedTensor | None:
    """``tensor`` kept quantized with its rows in Hugging Face order, or None if its type is not kept."""
    packed = gguf_quant.pack_tensor(tensor)
    if packed is None:
        return None
    identity = np.arange(packed.shape[0])
    rows = _hf_rows(identity, tensor.name, config)
    return packed if np.array_equal(rows, identity) else packed.take_rows(rows)


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved -> rotate-half RoPE layout).

    llama.cpp stores each head's rows as ``[head_dim/2, 2]`` pairs (x0, x_half,
    x1, x_half+1, ...); swapping those two axes back restores Hugging Face's
    ``[2, head_dim/2]`` halves. Works for weights ``[rows, in]`` and biases ``[rows]``.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    grouped = weight.reshape(num_heads, half, 2, *weight.shape[1:])  # [heads, head_dim/2, 2, ...]
    return grouped.swapaxes(1, 2).reshape(weight.shape)             # [heads, 2, head_dim/2, ...] -> rows
