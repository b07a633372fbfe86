"""GGUF architectures: metadata -> ``ModelConfig``, llama.cpp tensor names -> canonical ones.

Read GGUF architectures (``general.architecture``) and the family each is:
``llama`` (Llama, SmolLM, Mistral; Mixtral when it has experts), ``qwen2``,
``qwen3``, ``qwen2moe``, ``qwen3moe``, ``gemma2``, ``gemma3``. What llama.cpp's
converter changes, and how it is undone (``model.weights.gguf_reader`` applies
it per tensor):

- Q/K rows are permuted to the interleaved RoPE layout for ``llama`` only
  (the other families use NeoX RoPE, already rotate-half): ``permutes_qk``;
- Gemma's norm weights are stored plus one (the ``1 + weight`` of its
  RMSNorm): ``norm_value_shift`` gives the shift to take off;
- settings llama.cpp does not store are derived as it does: Gemma's
  ``query_pre_attn_scalar`` (``hidden / heads`` for the 27B models, else
  ``head_dim``), Gemma 3's local RoPE base (10000 unless ``rope.freq_base_swa``)
  and the sliding-layer pattern (every 2nd / 6th layer full unless
  ``attention.sliding_window_pattern`` says).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from model.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig
from model.weights.canonical import expected_shapes

# general.architecture -> ModelConfig.architecture ("llama" becomes "mixtral" when it has experts)
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe",
                      "qwen3moe": "qwen3_moe", "gemma2": "gemma2", "gemma3": "gemma3"}
SUPPORTED = tuple(GGUF_ARCHITECTURES)

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",          # the pre-MLP norm (pre_feedforward_layernorm in Gemma)
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
SANDWICH_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def field(reader, key: str, default=None):
    """The decoded value of metadata ``key`` (scalars as Python values, arrays as lists)."""
    entry = reader.fields.get(key)
    return default if entry is None else entry.contents()


def model_config(reader, path: Path) -> ModelConfig:
    """The ``ModelConfig`` of the file's ``{arch}.*`` and tokenizer metadata (ValueError naming ``path``)."""
    arch = field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; pagedgen reads "
            f"{', '.join(SUPPORTED)} GGUF files (Llama, SmolLM, Mistral, Mixtral, Qwen2/3, Qwen-MoE, "
            f"Gemma 2/3). For other models pass their Hugging Face directory"
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
    layers = int(need("block_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else int(need("vocab_size"))
    head_dim = int(field(reader, f"{arch}.attention.key_length") or field(reader, f"{arch}.rope.dimension_count")
                   or hidden // heads)
    rotary = int(field(reader, f"{arch}.rope.dimension_count") or head_dim)
    eos = [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    architecture = GGUF_ARCHITECTURES[arch]
    experts = int(field(reader, f"{arch}.expert_count") or 0)
    if arch == "llama" and experts:
        architecture = "mixtral"
    fields = dict(
        architecture=architecture,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(field(reader, f"{arch}.feed_forward_length") or 0),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(field(reader, f"{arch}.attention.head_count_kv") or heads),
        head_dim=head_dim,
        max_position_embeddings=int(need("context_length")),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        partial_rotary_factor=rotary / head_dim,
    )
    if arch.startswith("gemma"):
        fields.update(_gemma(reader, arch, fields, need))
    window = field(reader, f"{arch}.attention.sliding_window")
    if window and not arch.startswith("gemma") and int(window) < fields["max_position_embeddings"]:
        fields.update(sliding_window=int(window), layer_types=(SLIDING_ATTENTION,) * layers)
    if experts:
        fields.update(_moe(reader, arch, fields, experts, tensor_names))
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _gemma(reader, arch: str, fields: dict, need) -> dict:
    """Gemma 2/3 settings: soft-caps, scale, window pattern, local RoPE base, GeGLU."""
    layers, hidden, heads = fields["num_hidden_layers"], fields["hidden_size"], fields["num_attention_heads"]
    big = layers == (46 if arch == "gemma2" else 62)            # the 27B models: llama.cpp's rule
    pattern = field(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, (list, tuple)):
        sliding = [bool(p) for p in pattern]
    else:
        period = int(pattern) if pattern else (2 if arch == "gemma2" else 6)
        sliding = [bool((i + 1) % period) for i in range(layers)]
    out = {
        "hidden_act": "gelu_tanh",
        "query_pre_attn_scalar": float(hidden // heads if big else fields["head_dim"]),
        "final_logit_softcap": field(reader, f"{arch}.final_logit_softcapping"),
        "sliding_window": int(need("attention.sliding_window")),
        "layer_types": tuple(SLIDING_ATTENTION if s else FULL_ATTENTION for s in sliding),
    }
    if arch == "gemma2":
        out["attn_logit_softcap"] = field(reader, f"{arch}.attn_logit_softcapping")
    else:
        out["sliding_rope_theta"] = float(field(reader, f"{arch}.rope.freq_base_swa", 10000.0))
    return out


def _moe(reader, arch: str, fields: dict, experts: int, tensor_names: set[str]) -> dict:
    """The expert shape: counts, expert width, renormalisation, shared expert, dense layers."""
    shared = int(field(reader, f"{arch}.expert_shared_feed_forward_length") or 0)
    if shared == 0 and "blk.0.ffn_gate_shexp.weight" in tensor_names:
        shared = int(next(t for t in reader.tensors if t.name == "blk.0.ffn_gate_shexp.weight").shape[1])
    width = field(reader, f"{arch}.expert_feed_forward_length") or fields["intermediate_size"]
    dense = tuple(i for i in range(fields["num_hidden_layers"]) if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names)
    return {
        "num_experts": experts,
        "num_experts_per_tok": int(field(reader, f"{arch}.expert_used_count") or 0),
        "moe_intermediate_size": int(width),
        # llama.cpp renormalises the top-k weights of Mixtral and Qwen3-MoE, not of Qwen2-MoE
        "norm_topk_prob": bool(field(reader, f"{arch}.expert_weights_norm", arch != "qwen2moe")),
        "shared_expert_intermediate_size": shared,
        "dense_layers": dense,
    }


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


def canonical_name(gguf_name: str, path: Path, config: ModelConfig | None = None) -> str:
    """Map a llama.cpp tensor name to the canonical Hugging Face one (Gemma's norms by ``config``)."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    names = {**LAYER_NAMES, **SANDWICH_NAMES} if config is not None and config.traits.sandwich_norms else LAYER_NAMES
    if match is None or match.group(2) not in names:
        arch = config.architecture if config is not None else "llama"
        raise ValueError(f"{path}: unexpected tensor {gguf_name!r} for a {arch} GGUF")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{names[part]}.{kind}"


def check_tensors(reader, config: ModelConfig, path: Path) -> None:
    """Names and shapes of every tensor against ``config``, from the metadata alone (ValueError naming ``path``)."""
    shapes = expected_shapes(config)
    seen = set()
    for tensor in reader.tensors:
        name = canonical_name(tensor.name, path, config)
        seen.add(name)
        shape = tuple(int(n) for n in reversed(tensor.shape))            # ggml ne is innermost-first
        want = shapes.get(name)
        if want is None:
            raise ValueError(f"{path}: tensor {tensor.name} ({name}) is not part of this {config.architecture} model")
        if shape != want and not (int(np.prod(shape)) == int(np.prod(want)) and len(want) == 2 and want[0] == 1):
            raise ValueError(f"{path}: tensor {tensor.name} has shape {shape}, the metadata implies {want}")
    missing = sorted(set(shapes) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{path}: the GGUF lacks tensors its metadata implies: {shown}")


def permutes_qk(config: ModelConfig) -> bool:
    """Whether llama.cpp permuted Q/K rows to the interleaved layout (the ``llama`` GGUF architecture)."""
    return config.architecture in ("llama", "mistral", "mixtral")


def hf_values(values: np.ndarray, gguf_name: str, config: ModelConfig) -> np.ndarray:
    """A dequantised tensor as the Hugging Face checkpoint holds it (rows already in HF order).

    Takes off the one llama.cpp adds to Gemma's norm weights, and gives a
    shared-expert gate stored as ``[hidden]`` its ``[1, hidden]`` shape.
    """
    if gguf_name.endswith("norm.weight") and config.traits.norm_weight_offset:
        values = values - np.float32(config.traits.norm_weight_offset)
    if ".ffn_gate_inp_shexp." in gguf_name:
        values = values.reshape(1, -1)
    return values
