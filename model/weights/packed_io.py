"""Weights with ``QuantizedTensor`` values as one safetensors file (the GGUF cache's packed entries).

Caching a GGUF kept quantized turns a later start into one sequential read of
about the file's size, instead of re-laying every block out again
(``model.weights.gguf_quant``: about 10 s for the default model). Layout:

- a float tensor ``name``: stored as float32 under ``name``;
- a ``QuantizedTensor`` ``name``: three tensors, ``name.codes`` (U32),
  ``name.scales`` and ``name.biases`` (F16 or F32, as held), and an entry in
  the header's ``__metadata__["pagedgen_quantized"]`` (JSON) mapping ``name``
  to ``[bits, group_size, source, is_exact]``.

Any safetensors reader can open the file; only ``read_packed`` reassembles it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from model.weights.quant import QuantizedTensor
from model.weights.safetensors_io import read_full_header

METADATA_KEY = "pagedgen_quantized"
_PARTS = ("codes", "scales", "biases")
_STORED = {"U32": np.dtype("<u4"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}


def write_packed(path: str | os.PathLike, weights: dict, metadata: dict[str, str] | None = None) -> None:
    """Write ``weights`` (numpy arrays and ``QuantizedTensor`` values) to ``path``."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    layouts: dict[str, list] = {}
    for name, tensor in weights.items():
        if isinstance(tensor, QuantizedTensor):
            for part in _PARTS:
                tensors[f"{name}.{part}"] = np.ascontiguousarray(getattr(tensor, part))
            layouts[name] = [tensor.bits, tensor.group_size, tensor.source, tensor.is_exact]
        else:
            tensors[name] = np.ascontiguousarray(tensor, dtype=np.float32)
    save_file(tensors, str(path), metadata={**(metadata or {}), METADATA_KEY: json.dumps(layouts)})


def read_packed(path: str | os.PathLike) -> dict:
    """The weights ``write_packed`` wrote: owned numpy arrays and ``QuantizedTensor`` values."""
    path = Path(path)
    header, data_start = read_full_header(path)
    metadata = header.pop("__metadata__", None) or {}
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} holds no {METADATA_KEY} metadata (not written by write_packed)")
    layouts = json.loads(metadata[METADATA_KEY])
    raw: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            stored = _STORED.get(info["dtype"])
            if stored is None:
                raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, not one of {', '.join(_STORED)}")
            begin, end = info["data_offsets"]
            array = np.empty(tuple(info["shape"]), dtype=stored)
            if array.nbytes != end - begin:
                raise ValueError(f"{path}: tensor {name!r} has {end - begin} bytes, its shape needs {array.nbytes}")
            f.seek(data_start + begin)
            if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != array.nbytes:
                raise ValueError(f"{path} is truncated at tensor {name!r}")
            raw[name] = array.astype(array.dtype.newbyteorder("="), copy=False)
    weights: dict = {}
    for name, (bits, group_size, source, is_exact) in layouts.items():
        parts = [raw.pop(f"{name}.{part}", None) for part in _PARTS]
        if any(p is None for p in parts):
            raise ValueError(f"{path}: quantized tensor {name!r} lacks its codes, scales or biases")
        weights[name] = QuantizedTensor(*parts, bits=bits, group_size=group_size, source=source, is_exact=is_exact)
    for name, array in raw.items():
        weights[name] = array if array.dtype == np.float32 else array.astype(np.float32)
    return weights
