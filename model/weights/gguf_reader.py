"""Read a llama-architecture GGUF file into float32 canonical weights.

Three things separate a GGUF tensor from its Hugging Face counterpart:

1. names (``blk.3.attn_q.weight`` vs ``model.layers.3.self_attn.q_proj.weight``);
2. quantisation (Q4_1, Q8_0, ...), undone with ``gguf.quants.dequantize``;
3. llama.cpp's converter permutes the rows of Q and K from Hugging Face's
   rotate-half RoPE layout to the interleaved one; ``unpermute_qk`` undoes it,
   exactly as transformers' GGUF loader does, so the arrays equal what
   ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` holds.

Dimensions need no reversal by hand: ``GGUFReader`` already exposes each
tensor with numpy (row-major) shape, i.e. ggml's ``ne`` reversed, which is the
Hugging Face ``[out_features, in_features]`` order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.model_config import ModelConfig
from engine.weights.canonical import check_weights

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


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


def field(reader, key: str, default=None):
    """The decoded value of metadata ``key`` (scalars as Python values, arrays as lists)."""
    entry = reader.fields.get(key)
    return default if entry is None else entry.contents()


def read_gguf(path: Path) -> GGUFCheckpoint:
    """Dequantise the whole file; raises ValueError for a non-llama architecture."""
    reader = open_gguf(path)
    config = gguf_model_config(reader, path)
    weights: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = canonical_name(tensor.name, path)
        weights[name] = _dequantize(tensor, path, config)
    return GGUFCheckpoint(config, check_weights(config, weights, str(path)), config.max_position_embeddings)


def gguf_model_config(reader, path: Path) -> ModelConfig:
    """Build the ``ModelConfig`` from the file's ``llama.*`` and tokenizer metadata."""
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; pagedgen reads "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)} GGUF files (Llama, SmolLM, Mistral). "
            f"For other models pass their Hugging Face directory"
        )
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(
            f"{path}: stores Llama-3 RoPE frequencies as a rope_freqs tensor, which is not supported; "
            f"load the model's Hugging Face directory instead (its rope_scaling is read)"
        )

    def need(key: str):
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else int(need("vocab_size"))
    head_dim = field(reader, f"{arch}.attention.key_length") or field(reader, f"{arch}.rope.dimension_count")
    eos = [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return ModelConfig(
        architecture="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(field(reader, f"{arch}.attention.head_count_kv") or heads),
        head_dim=int(head_dim or hidden // heads),
        max_position_embeddings=int(need("context_length")),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
    )


def _rope_scaling(reader, arch: str) -> dict | None:
    """HF-style rope_scaling from ``{arch}.rope.scaling.*``, or None."""
    kind = field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict = {"rope_type": kind, "factor": float(field(reader, f"{arch}.rope.scaling.factor", 1.0))}
    original = field(reader, f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def canonical_name(gguf_name: str, path: Path) -> str:
    """Map a llama.cpp tensor name to the canonical Hugging Face one."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"{path}: unexpected tensor {gguf_name!r} for a llama GGUF")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


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
    values = values.reshape(hf_shape)
    if ".attn_q." in tensor.name:
        values = unpermute_qk(values, config.num_attention_heads)
    elif ".attn_k." in tensor.name:
        values = unpermute_qk(values, config.num_key_value_heads)
    return np.array(values, dtype=np.float32, order="C")  # copy: never a view of the mmap


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
