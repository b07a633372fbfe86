"""Map a Hugging Face config.json to a ``ModelConfig``: one small function per family.

Supported ``model_type`` (and the ``architectures`` class each names):
llama (SmolLM too), mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, mixtral,
qwen2_moe, qwen3_moe. Both the transformers 4 spelling of rope settings
(``rope_theta`` + ``rope_scaling``, ``rope_local_base_freq``) and the
transformers 5 one (``rope_parameters``, per layer type for Gemma 3) are read.
Sliding windows follow transformers' rules per family: Mistral, Phi-3 and
Mixtral window every layer when ``sliding_window`` is set, the Qwen families
only with ``use_sliding_window``, Gemma by its layer pattern (``layer_types``
when config.json lists them).
"""

from __future__ import annotations

from pathlib import Path

from model.config import FULL_ATTENTION, SLIDING_ATTENTION, SUPPORTED_ARCHITECTURES, ModelConfig

# model_type -> (ModelConfig.architecture, the ForCausalLM class config.json's "architectures" names)
MODEL_TYPES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3_text": ("gemma3", "Gemma3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "mixtral": ("mixtral", "MixtralForCausalLM"),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
_HINTS = {
    "gemma3": "the multimodal Gemma 3 (Gemma3ForConditionalGeneration) is not served; its text-only "
              "checkpoints (model_type gemma3_text, e.g. gemma-3-1b) are",
    "phi": "Phi-1/Phi-2 are not served; Phi-3, Phi-3.5 and Phi-4-mini (model_type phi3) are",
    "gemma": "Gemma 1 is not served; Gemma 2 and Gemma 3 text are",
}


def model_config_from_hf(raw: dict, source: Path | str, has_lm_head: bool = True) -> tuple[ModelConfig, int]:
    """Map a config.json dict to ``(ModelConfig, max_model_len)``.

    ``source`` is the model directory (named in errors); ``has_lm_head``
    decides tying when config.json does not say.
    """
    file = f"{source}/config.json"
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        hint = f" ({_HINTS[model_type]})" if model_type in _HINTS else ""
        raise ValueError(
            f"{file}: model_type {model_type!r} is not supported{hint}; supported: "
            f"{', '.join(MODEL_TYPES)} (SmolLM is llama)"
        )
    architecture, causal_lm = MODEL_TYPES[model_type]
    classes = raw.get("architectures") or [causal_lm]
    if causal_lm not in classes:
        raise ValueError(
            f"{file}: architectures {classes} is not supported for model_type {model_type!r}; "
            f"pagedgen serves {causal_lm} (a causal language model)"
        )
    reader = _Reader(raw, file)
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
        raise ValueError(f"{file}: hidden_act {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    if raw.get("mlp_bias"):
        raise ValueError(f"{file}: mlp_bias=true is not supported")
    if raw.get("use_bidirectional_attention"):
        raise ValueError(f"{file}: use_bidirectional_attention=true (an encoder) is not supported")
    hidden = reader.int("hidden_size")
    heads = reader.int("num_attention_heads")
    rope_theta, rope_scaling = rope_settings(raw)
    tie = raw.get("tie_word_embeddings")
    fields = dict(
        architecture=architecture,
        vocab_size=reader.int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=reader.int("intermediate_size"),
        num_hidden_layers=reader.int("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        max_position_embeddings=reader.int("max_position_embeddings"),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=(not has_lm_head) if tie is None else bool(tie),
        attention_bias=bool(raw.get("attention_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id"), _generation_eos(source)),
        hidden_act=ACTIVATIONS[act],
    )
    fields.update(_FAMILIES[architecture](raw, reader, fields))
    if fields["rope_scaling"] and fields["rope_scaling"]["rope_type"] not in ROPE_TYPES:
        raise ValueError(f"{file}: rope type {fields['rope_scaling']['rope_type']!r} is not supported; "
                         f"supported: {', '.join(ROPE_TYPES)}")
    try:
        config = ModelConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    return config, config.max_position_embeddings


class _Reader:
    """Required config.json keys, with errors naming the file."""

    def __init__(self, raw: dict, file: str) -> None:
        self.raw, self.file = raw, file

    def need(self, key: str):
        if self.raw.get(key) is None:
            raise ValueError(f"{self.file} lacks {key!r}")
        return self.raw[key]

    def int(self, key: str) -> int:
        return int(self.need(key))


def _layer_types(raw: dict, num_layers: int, sliding: list[bool]) -> tuple[str, ...]:
    """config.json's ``layer_types`` when listed, else the family's pattern ``sliding``."""
    listed = raw.get("layer_types")
    if listed:
        return tuple(listed)
    return tuple(SLIDING_ATTENTION if s else FULL_ATTENTION for s in sliding)


def _every_layer_window(raw: dict, reader: _Reader, fields: dict, gate: str | None = None) -> dict:
    """A window on every layer when ``sliding_window`` is set (and ``raw[gate]``, where a gate is named)."""
    window = raw.get("sliding_window")
    if not window or (gate is not None and not raw.get(gate)):
        return {}
    n = fields["num_hidden_layers"]
    return {"sliding_window": int(window), "layer_types": _layer_types(raw, n, [True] * n)}


def _qwen_window(raw: dict, fields: dict) -> dict:
    """Qwen2/Qwen3: windows on layers >= max_window_layers, only with use_sliding_window."""
    window = raw.get("sliding_window") if raw.get("use_sliding_window") else None
    if not window:
        return {}
    n = fields["num_hidden_layers"]
    first = int(raw.get("max_window_layers", 28))
    types = _layer_types(raw, n, [i >= first for i in range(n)])
    if SLIDING_ATTENTION not in types:
        return {}
    return {"sliding_window": int(window), "layer_types": types}


def _llama(raw: dict, reader: _Reader, fields: dict) -> dict:
    return {}


def _mistral(raw: dict, reader: _Reader, fields: dict) -> dict:
    return _every_layer_window(raw, reader, fields)


def _qwen2(raw: dict, reader: _Reader, fields: dict) -> dict:
    return {"attention_bias": True, **_qwen_window(raw, fields)}


def _qwen3(raw: dict, reader: _Reader, fields: dict) -> dict:
    return _qwen_window(raw, fields)


def _gemma(raw: dict, reader: _Reader, fields: dict, pattern: int) -> dict:
    """Gemma 2 and 3: scale, soft-caps and windows on all but every ``pattern``-th layer."""
    n = fields["num_hidden_layers"]
    window = int(reader.need("sliding_window"))
    types = _layer_types(raw, n, [bool((i + 1) % pattern) for i in range(n)])
    return {
        "query_pre_attn_scalar": float(raw.get("query_pre_attn_scalar") or fields["head_dim"]),
        "final_logit_softcap": raw.get("final_logit_softcapping"),
        "sliding_window": window if SLIDING_ATTENTION in types else None,
        "layer_types": types,
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", True)),
    }


def _gemma2(raw: dict, reader: _Reader, fields: dict) -> dict:
    return {**_gemma(raw, reader, fields, 2), "attn_logit_softcap": raw.get("attn_logit_softcapping")}


def _gemma3(raw: dict, reader: _Reader, fields: dict) -> dict:
    # transformers' Gemma 3 attention does not apply attn_logit_softcapping, so neither does pagedgen
    out = _gemma(raw, reader, fields, int(raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6))
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get(SLIDING_ATTENTION), dict):
        local = dict(params[SLIDING_ATTENTION])
        full = dict(params.get(FULL_ATTENTION) or {})
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"{reader.file}: sliding-layer rope type {local['rope_type']!r} is not supported")
        out["sliding_rope_theta"] = float(local.get("rope_theta", 10000.0))
        out["rope_theta"], out["rope_scaling"] = rope_settings({"rope_parameters": full, "rope_theta": 1e6})
    else:
        out["sliding_rope_theta"] = float(raw.get("rope_local_base_freq", 10000.0))
        out["rope_theta"] = float(raw.get("rope_theta", 1e6))
    return out


def _phi3(raw: dict, reader: _Reader, fields: dict) -> dict:
    out = _every_layer_window(raw, reader, fields)
    if out and out["sliding_window"] >= fields["max_position_embeddings"]:
        out = {}                          # Phi-3.5 / Phi-4-mini: a window past the context is no window
    scaling = fields["rope_scaling"]
    params = raw.get("rope_parameters") or {}
    factor = raw.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    out["partial_rotary_factor"] = float(factor)
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "partial_rotary_factor"}
        if scaling["rope_type"] == "su":          # the name LongRoPE had in the first Phi-3 configs
            scaling["rope_type"] = "longrope"
        if scaling["rope_type"] == "longrope":
            original = scaling.get("original_max_position_embeddings", raw.get("original_max_position_embeddings"))
            if original is None:
                raise ValueError(f"{reader.file}: longrope needs original_max_position_embeddings")
            scaling["original_max_position_embeddings"] = int(original)
            half = int(fields["head_dim"] * factor) // 2
            for key in ("short_factor", "long_factor"):
                if len(scaling.get(key) or ()) != half:
                    raise ValueError(f"{reader.file}: longrope {key} must have rotary_dim / 2 = {half} entries")
        out["rope_scaling"] = scaling
    return out


def _moe(raw: dict, reader: _Reader, fields: dict, expert_size_key: str) -> dict:
    """The expert shape shared by the MoE families; dense layers per mlp_only_layers / decoder_sparse_step."""
    n = fields["num_hidden_layers"]
    step = int(raw.get("decoder_sparse_step") or 1)
    only_dense = set(raw.get("mlp_only_layers") or ())
    experts = raw.get("num_experts", raw.get("num_local_experts"))
    if experts is None:
        raise ValueError(f"{reader.file} lacks 'num_experts'")
    return {
        "num_experts": int(experts),
        "num_experts_per_tok": reader.int("num_experts_per_tok"),
        "moe_intermediate_size": reader.int(expert_size_key),
        "dense_layers": tuple(i for i in range(n) if i in only_dense or (i + 1) % step),
    }


def _mixtral(raw: dict, reader: _Reader, fields: dict) -> dict:
    return {**_moe(raw, reader, fields, "intermediate_size"), "norm_topk_prob": True,
            **_every_layer_window(raw, reader, fields)}


def _qwen2_moe(raw: dict, reader: _Reader, fields: dict) -> dict:
    n = fields["num_hidden_layers"]
    window = raw.get("sliding_window") if raw.get("use_sliding_window") else None
    first = int(raw.get("max_window_layers", 28))
    types = _layer_types(raw, n, [bool((i + 1) % 2) and i < first for i in range(n)]) if window else ()
    out = {**_moe(raw, reader, fields, "moe_intermediate_size"), "attention_bias": bool(raw.get("qkv_bias", True)),
           "norm_topk_prob": bool(raw.get("norm_topk_prob", False)),
           "shared_expert_intermediate_size": int(raw.get("shared_expert_intermediate_size") or 0)}
    if SLIDING_ATTENTION in types:
        out.update(sliding_window=int(window), layer_types=types)
    return out


def _qwen3_moe(raw: dict, reader: _Reader, fields: dict) -> dict:
    return {**_moe(raw, reader, fields, "moe_intermediate_size"), "norm_topk_prob": bool(raw.get("norm_topk_prob", False)),
            **_every_layer_window(raw, reader, fields, gate="use_sliding_window")}


_FAMILIES = {
    "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "gemma2": _gemma2,
    "gemma3": _gemma3, "phi3": _phi3, "mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe,
}
assert set(_FAMILIES) == set(SUPPORTED_ARCHITECTURES)


def rope_settings(raw: dict) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` from either config spelling.

    ``rope_scaling`` comes back in the HF dict form with a ``rope_type`` key,
    or None for plain RoPE.
    """
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        params = params.get(FULL_ATTENTION) or next(iter(params.values()))  # per layer type
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = dict(raw.get("rope_scaling") or {})
    if "type" in scaling:  # the old spelling of rope_type
        scaling.setdefault("rope_type", scaling["type"])
        del scaling["type"]
    if scaling.get("rope_type", "default") == "default":
        return float(theta), None
    return float(theta), scaling


def _generation_eos(source: Path | str) -> object:
    """eos_token_id of generation_config.json next to config.json, if any."""
    import json

    import structlog

    file = Path(source) / "generation_config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError):
        structlog.get_logger(__name__).warning("generation_config_unreadable", path=str(file))
        return None


def _eos_ids(*values: object) -> tuple[int, ...]:
    """Flatten int / list / None eos values into unique ids, first seen first."""
    ids: list[int] = []
    for value in values:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and int(item) not in ids:
                ids.append(int(item))
    return tuple(ids)
