"""Read a local Hugging Face model directory (config.json + safetensors).

``model.weights.hf_config`` maps config.json to a ``ModelConfig`` (which
families are served, and how); this module finds every canonical tensor in
the safetensors files and reads it. Checkpoint tensors that are stored
differently from the canonical layout are assembled here:

- Phi-3's fused ``self_attn.qkv_proj`` and ``mlp.gate_up_proj`` are split by rows;
- per-expert tensors (Qwen-MoE's ``mlp.experts.{e}.{gate,up,down}_proj``,
  Mixtral's ``block_sparse_moe.experts.{e}.{w1,w3,w2}``) are stacked into
  ``mlp.experts.*_proj.weight`` ``[experts, ...]``; transformers 5's fused
  ``mlp.experts.gate_up_proj`` / ``down_proj`` are split.

Names and shapes are checked against the config from the file headers alone,
before any tensor is read: a missing tensor or a wrong shape is one error
naming the directory or file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from model.config import ModelConfig
from model.weights import mlx_quant
from model.weights.canonical import check_weights, expected_shapes
from model.weights.hf_config import model_config_from_hf, rope_settings
from model.weights.quant import check_quantized_weights
from model.weights.safetensors_io import read_header, read_safetensors

logger = structlog.get_logger(__name__)

INDEX_FILE = "model.safetensors.index.json"
__all__ = ["HFCheckpoint", "model_config_from_hf", "read_config_json", "read_hf_dir", "rope_settings",
           "safetensors_files"]


@dataclass(frozen=True)
class HFCheckpoint:
    """What a Hugging Face directory holds, in pagedgen's terms."""

    config: ModelConfig
    weights: dict[str, np.ndarray]
    max_model_len: int


@dataclass(frozen=True)
class _Part:
    """One checkpoint tensor (or a slice of it) that goes into a canonical tensor."""

    file: Path                         # the safetensors file holding it
    name: str                          # its name there
    index: tuple                       # the slice of it taken (() for all of it)


def read_hf_dir(path: Path, keep_quantized: bool = False) -> HFCheckpoint:
    """Read config and float32 weights of the model in directory ``path``.

    An MLX quantized checkpoint (``model.weights.mlx_quant``) is dequantised,
    or with ``keep_quantized`` its quantized modules stay ``QuantizedTensor``.
    """
    raw = read_config_json(path)
    files = safetensors_files(path)
    located = _tensor_locations(files)
    config, max_model_len = model_config_from_hf(raw, path, has_lm_head="lm_head.weight" in located)
    quantization = mlx_quant.quantization_of(raw, path)
    if quantization is not None:
        weights = mlx_quant.read_mlx_weights(files, config, quantization, keep_quantized)
        return HFCheckpoint(config, check_quantized_weights(config, weights, str(path)), max_model_len)
    recipes = _plan(config, located, path)
    wanted: dict[Path, set[str]] = {}
    for parts, _ in recipes.values():
        for part in parts:
            wanted.setdefault(part.file, set()).add(part.name)
    arrays: dict[tuple[Path, str], np.ndarray] = {}
    for file, names in wanted.items():
        arrays.update(((file, name), a) for name, a in read_safetensors(file, names=names).items())
    weights = {}
    for name, (parts, stacked) in recipes.items():
        pieces = [arrays[(p.file, p.name)][p.index] for p in parts]
        weights[name] = np.stack(pieces) if stacked else pieces[0]              # per-expert parts: [experts, ...]
    return HFCheckpoint(config, check_weights(config, weights, str(path)), max_model_len)


def _tensor_locations(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Checkpoint tensor name -> (file, shape), from the headers."""
    located: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        for name, info in read_header(file)[0].items():
            located[name] = (file, tuple(info["shape"]))
    return located


def _plan(config: ModelConfig, located: dict, path: Path) -> dict[str, tuple[list[_Part], bool]]:
    """Every canonical tensor's checkpoint parts and whether they are stacked (one per expert).

    ValueError on a missing tensor or a wrong shape.
    """
    recipes: dict[str, tuple[list[_Part], bool]] = {}
    missing = []
    for name, shape in expected_shapes(config).items():
        found = _find(config, name, shape, located)
        if found is None:
            missing.append(name)
            continue
        for part, want in found:
            have = located[part.name][1]
            if have != want:
                raise ValueError(f"{part.file}: tensor {part.name} has shape {have}, "
                                 f"the config ({path}/config.json) implies {want}")
        recipes[name] = ([part for part, _ in found], len(found[0][1]) < len(shape))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{path}: the safetensors files lack tensors the config implies: {shown}")
    return recipes


def _find(config: ModelConfig, name: str, shape: tuple[int, ...],
          located: dict) -> list[tuple[_Part, tuple[int, ...]]] | None:
    """Where canonical ``name`` comes from: ``[(part, the shape that checkpoint tensor must have)]``."""
    def part(source: str, index: tuple = ()) -> _Part:
        return _Part(located[source][0], source, index)

    if name in located:
        return [(part(name), shape)]
    prefix, _, leaf = name.partition(".self_attn.")
    if leaf in ("q_proj.weight", "k_proj.weight", "v_proj.weight"):          # Phi-3: fused qkv_proj
        fused = f"{prefix}.self_attn.qkv_proj.weight"
        if fused not in located:
            return None
        q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        start = {"q": 0, "k": q, "v": q + kv}[leaf[0]]
        return [(part(fused, (slice(start, start + shape[0]),)), (q + 2 * kv, config.hidden_size))]
    prefix, _, leaf = name.partition(".mlp.")
    if leaf in ("gate_proj.weight", "up_proj.weight"):                       # Phi-3: fused gate_up_proj
        fused = f"{prefix}.mlp.gate_up_proj.weight"
        if fused not in located:
            return None
        rows = slice(0, shape[0]) if leaf.startswith("gate") else slice(shape[0], 2 * shape[0])
        return [(part(fused, (rows,)), (2 * shape[0], config.hidden_size))]
    if leaf == "gate.weight":                                                # Mixtral's router
        source = f"{prefix}.block_sparse_moe.gate.weight"
        return [(part(source), shape)] if source in located else None
    if leaf.startswith("experts."):
        return _find_experts(prefix, leaf.split(".")[1], shape, located, part)
    return None


_MIXTRAL_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _find_experts(prefix: str, proj: str, shape: tuple[int, ...], located: dict, part):
    """Stacked expert ``proj`` of one layer: per-expert tensors, or transformers 5's fused ones."""
    experts = shape[0]
    for template in (f"{prefix}.mlp.experts.{{e}}.{proj}.weight",
                     f"{prefix}.block_sparse_moe.experts.{{e}}.{_MIXTRAL_EXPERT[proj]}.weight"):
        names = [template.format(e=e) for e in range(experts)]
        if all(n in located for n in names):
            return [(part(n), shape[1:]) for n in names]
    if proj == "down_proj" and f"{prefix}.mlp.experts.down_proj" in located:
        return [(part(f"{prefix}.mlp.experts.down_proj"), shape)]
    fused = f"{prefix}.mlp.experts.gate_up_proj"
    if fused in located:
        inter = shape[1]
        rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
        return [(part(fused, (slice(None), rows)), (experts, 2 * inter, shape[2]))]
    return None


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


