"""Read a local Hugging Face model directory (config.json + safetensors).

Supported ``model_type``: llama (SmolLM too), mistral, qwen2. Both the
transformers 4 spelling of rope settings (``rope_theta`` + ``rope_scaling``)
and the transformers 5 one (``rope_parameters``) are understood.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from engine.model_config import SUPPORTED_ARCHITECTURES, ModelConfig
from engine.weights.canonical import check_weights, expected_shapes
from engine.weights.safetensors_io import read_header, read_safetensors

logger = structlog.get_logger(__name__)

INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class HFCheckpoint:
    """What a Hugging Face directory holds, in pagedgen's terms."""

    config: ModelConfig
    weights: dict[str, np.ndarray]
    max_model_len: int


def read_hf_dir(path: Path) -> HFCheckpoint:
    """Read config and float32 weights of the model in directory ``path``."""
    raw = read_config_json(path)
    files = safetensors_files(path)
    has_lm_head = "lm_head.weight" in _tensor_names(files)
    config, max_model_len = model_config_from_hf(raw, path, has_lm_head=has_lm_head)
    wanted = set(expected_shapes(config))
    weights: dict[str, np.ndarray] = {}
    for file in files:
        weights.update(read_safetensors(file, names=wanted))
    return HFCheckpoint(config, check_weights(config, weights, str(path)), max_model_len)


def read_config_json(path: Path) -> dict:
    """The parsed config.json of ``path`` (ValueError if absent or not JSON)."""
    file = path / "config.json"
    if not file.is_file():
        raise ValueError(
            f"{path} has no config.json; pass a .gguf file or a Hugging Face model directory "
            f"(config.json + *.safetensors + tokenizer files)"
        )
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of ``path``: the shards of an index, or the single file."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} lists shards that are not in {path}: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{path} has no *.safetensors weights; pytorch_model.bin checkpoints are not read, "
            f"re-save the model with save_pretrained(..., safe_serialization=True)"
        )
    return files


def _tensor_names(files: list[Path]) -> set[str]:
    names: set[str] = set()
    for file in files:
        names.update(read_header(file)[0])
    return names


def model_config_from_hf(raw: dict, source: Path | str, has_lm_head: bool = True) -> tuple[ModelConfig, int]:
    """Map a config.json dict to ``(ModelConfig, max_model_len)``.

    ``has_lm_head`` decides tying when config.json does not say.
    """
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (SmolLM is llama)"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported; only silu is")
    if raw.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=true is not supported")

    def need(key: str):
        if raw.get(key) is None:
            raise ValueError(f"{source}: config.json lacks {key!r}")
        return raw[key]

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    rope_theta, rope_scaling = rope_settings(raw)
    tie = raw.get("tie_word_embeddings")
    config = ModelConfig(
        architecture=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_hidden_layers=int(need("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        max_position_embeddings=int(need("max_position_embeddings")),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=(not has_lm_head) if tie is None else bool(tie),
        attention_bias=True if model_type == "qwen2" else bool(raw.get("attention_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id"), _generation_eos(source)),
    )
    return config, _max_model_len(raw, config, source)


def rope_settings(raw: dict) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` from either config spelling.

    ``rope_scaling`` comes back in the HF dict form with a ``rope_type`` key,
    or None for plain RoPE.
    """
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        params = params.get("full_attention") or next(iter(params.values()))  # per layer type
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
    file = Path(source) / "generation_config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError):
        logger.warning("generation_config_unreadable", path=str(file))
        return None


def _eos_ids(*values: object) -> tuple[int, ...]:
    """Flatten int / list / None eos values into unique ids, first seen first."""
    ids: list[int] = []
    for value in values:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and int(item) not in ids:
                ids.append(int(item))
    return tuple(ids)


def _max_model_len(raw: dict, config: ModelConfig, source: Path | str) -> int:
    """The longest sequence served: the position limit, capped by a sliding window.

    pagedgen attends over the whole sequence, which equals sliding-window
    attention only up to the window's length.
    """
    max_len = config.max_position_embeddings
    window = raw.get("sliding_window")
    uses_window = raw.get("use_sliding_window", config.architecture == "mistral")
    if window and uses_window and int(window) < max_len:
        logger.warning("max_model_len_capped_by_sliding_window", model=str(source), sliding_window=int(window))
        max_len = int(window)
    return max_len
