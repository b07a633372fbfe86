"""Read safetensors files straight into float32 numpy arrays, without torch.

The format is small: an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` and the raw
little-endian tensor bytes. Reading it here lets bf16 checkpoints (which
numpy has no dtype for) widen to float32 exactly, and lets every array be an
owned, aligned, writable, C-contiguous buffer that backends can wrap freely.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

# safetensors dtype -> numpy dtype of the stored bytes (bf16 read as raw uint16).
_STORED_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(path: Path) -> tuple[dict, int]:
    """Return ``(header without __metadata__, byte offset where tensor data starts)``."""
    header, data_start = read_full_header(path)
    header.pop("__metadata__", None)
    return header, data_start


def read_full_header(path: Path) -> tuple[dict, int]:
    """``read_header`` with the ``__metadata__`` entry (str -> str) kept, where the file has one."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES:
            raise ValueError(f"{path} is not a safetensors file (header length {header_len} is implausible)")
        header = json.loads(f.read(header_len))
    return header, 8 + header_len


def _read_into(f, array: np.ndarray, nbytes: int, path: Path, name: str) -> None:
    """Fill ``array`` with exactly ``nbytes`` from the current position of ``f``."""
    if nbytes == 0:
        return
    view = memoryview(array.reshape(-1).view(np.uint8))
    got = f.readinto(view)
    if got != nbytes:
        raise ValueError(f"{path} is truncated: tensor {name!r} needs {nbytes} bytes, read {got}")


def read_safetensors(path: str | os.PathLike, names: set[str] | None = None) -> dict[str, np.ndarray]:
    """Read the tensors of one file (all, or only ``names``) as float32 arrays."""
    path = Path(path)
    header, data_start = read_header(path)
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            if names is not None and name not in names:
                continue
            stored = _STORED_DTYPES.get(info["dtype"])
            if stored is None:
                raise ValueError(
                    f"{path}: tensor {name!r} has dtype {info['dtype']}; only "
                    f"{', '.join(_STORED_DTYPES)} checkpoints are supported (quantised safetensors are not)"
                )
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            raw = np.empty(shape, dtype=stored)
            if raw.nbytes != end - begin:
                raise ValueError(f"{path}: tensor {name!r} has {end - begin} bytes but shape {shape} needs {raw.nbytes}")
            f.seek(data_start + begin)
            _read_into(f, raw, raw.nbytes, path, name)
            out[name] = _to_float32(raw, info["dtype"])
    return out


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Widen stored values to native float32 (bf16 is the top half of a float32)."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if raw.dtype == np.dtype("=f4"):
        return raw
    return raw.astype(np.float32)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write float32 arrays to ``path`` (a plain safetensors file any tool can read)."""
    from safetensors.numpy import save_file

    contiguous = {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in tensors.items()}
    save_file(contiguous, str(path), metadata=metadata)
