"""MLX community checkpoints: safetensors whose linear weights MLX quantized.

``mlx_lm.convert -q`` writes config.json with ``"quantization": {"group_size":
64, "bits": 4}`` (optionally a ``"mode"``, and per-module entries that
override group size and bits, or say ``false`` for a module left in float),
and for each quantized module a triple: ``<module>.weight`` (uint32 codes),
``<module>.scales`` and ``<module>.biases`` (float16, bfloat16 or float32).
That is already the packed layout of ``model.weights.quant``, so the triple
is read as it is stored; only bfloat16 scales widen to float32 (exactly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.config import ModelConfig
from model.weights.canonical import expected_shapes
from model.weights.quant import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, QuantizedTensor, dequantize_all
from model.weights.safetensors_io import read_header, read_safetensors

# safetensors dtype -> numpy dtype of the stored bytes, for the parts of a triple (bf16 as raw uint16).
_RAW_DTYPES = {"U32": np.dtype("<u4"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


@dataclass(frozen=True)
class MLXQuantization:
    """The ``quantization`` entry of an MLX checkpoint's config.json."""

    group_size: int                                          # the default group size
    bits: int                                                # the default bits per code
    overrides: dict[str, tuple[int, int]] = field(default_factory=dict)   # module -> (group_size, bits)

    def __post_init__(self) -> None:
        for module, (group_size, bits) in {"default": (self.group_size, self.bits), **self.overrides}.items():
            if group_size not in SUPPORTED_GROUP_SIZES or bits not in SUPPORTED_BITS:
                raise ValueError(
                    f"{module}: MLX quantization with group_size {group_size} and bits {bits} is not supported "
                    f"(group_size {SUPPORTED_GROUP_SIZES}, bits {SUPPORTED_BITS})"
                )

    def of_module(self, module: str) -> tuple[int, int]:
        """``(group_size, bits)`` of ``module`` (e.g. ``model.layers.0.mlp.down_proj``)."""
        return self.overrides.get(module, (self.group_size, self.bits))


def quantization_of(raw: dict, source: Path | str) -> MLXQuantization | None:
    """The MLX quantization config.json ``raw`` declares, or None for a float checkpoint.

    Raises ValueError for a quantization pagedgen does not read (a non-affine
    MLX mode, or a ``quantization_config`` of GPTQ, AWQ and the like).
    """
    spec = raw.get("quantization")
    if not isinstance(spec, dict):
        other = raw.get("quantization_config")
        if isinstance(other, dict) and other.get("quant_method"):
            raise ValueError(
                f"{source}: {other['quant_method']} quantized checkpoints are not supported; "
                f"pass the float checkpoint, an MLX quantized one or a GGUF file"
            )
        return None
    mode = spec.get("mode", "affine")
    if mode != "affine":
        raise ValueError(f"{source}: MLX quantization mode {mode!r} is not supported; only affine is")
    if "group_size" not in spec or "bits" not in spec:
        raise ValueError(f"{source}: config.json quantization lacks group_size or bits: {spec}")
    overrides = {
        module: (int(value.get("group_size", spec["group_size"])), int(value.get("bits", spec["bits"])))
        for module, value in spec.items() if isinstance(value, dict)
    }
    return MLXQuantization(int(spec["group_size"]), int(spec["bits"]), overrides)


def read_mlx_weights(files: list[Path], config: ModelConfig, quantization: MLXQuantization,
                     keep_quantized: bool) -> dict:
    """The canonical weights of an MLX checkpoint's ``files``.

    A module stored as a weight/scales/biases triple becomes a
    ``QuantizedTensor`` (or, without ``keep_quantized``, its float32 values);
    every other tensor is read as float32.
    """
    headers = {file: read_header(file) for file in files}
    where = {name: file for file, (header, _) in headers.items() for name in header}
    weights: dict = {}
    floats: dict[Path, set[str]] = {}
    for name in expected_shapes(config):
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and f"{module}.scales" in where:
            group_size, bits = quantization.of_module(module)
            parts = [_read_raw(where[f"{module}.{part}"], headers[where[f"{module}.{part}"]], f"{module}.{part}")
                     for part in ("weight", "scales", "biases") if f"{module}.{part}" in where]
            if len(parts) != 3:
                raise ValueError(f"{files[0].parent}: {module} has scales but no biases or weight "
                                 f"(only affine MLX quantization is read)")
            try:
                weights[name] = QuantizedTensor(*parts, bits=bits, group_size=group_size, source="mlx-affine")
            except ValueError as e:
                raise ValueError(f"{files[0].parent}: {module}: {e}") from None
        elif name in where:
            floats.setdefault(where[name], set()).add(name)
    for file, names in floats.items():
        weights.update(read_safetensors(file, names=names))
    return weights if keep_quantized else dequantize_all(weights)


def _read_raw(file: Path, header_and_start: tuple[dict, int], name: str) -> np.ndarray:
    """One tensor as stored: uint32 codes, float16/float32 scales, bfloat16 widened to float32."""
    header, data_start = header_and_start
    info = header[name]
    stored = _RAW_DTYPES.get(info["dtype"])
    if stored is None:
        raise ValueError(f"{file}: {name} has dtype {info['dtype']}; MLX quantized tensors are U32 with F16/BF16/F32 scales")
    shape = tuple(info["shape"])
    begin, end = info["data_offsets"]
    count = int(np.prod(shape, dtype=np.int64))
    if count * stored.itemsize != end - begin:
        raise ValueError(f"{file}: tensor {name!r} has {end - begin} bytes, "
                         f"shape {shape} needs {count * stored.itemsize}")
    raw = np.fromfile(file, dtype=stored, count=count, offset=data_start + begin)
    if raw.size != count:
        raise ValueError(f"{file} is truncated at tensor {name!r}")
    raw = raw.reshape(shape)
    if info["dtype"] == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(raw.dtype.newbyteorder("="), copy=False)
