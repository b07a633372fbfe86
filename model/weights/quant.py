"""Group-quantized weights kept quantized: the one packed layout every backend reads.

The layout is MLX's affine quantization, so ``mx.quantized_matmul`` takes it
as it is and the Triton kernel (``backends.cuda.kernels.quant_matmul``) reads
the same arrays. A weight ``W [out, in]`` is cut along ``in`` into groups of
``group_size`` consecutive values, and::

    W[r, k] = scales[r, k // group_size] * q[r, k] + biases[r, k // group_size]

with ``q`` an unsigned ``bits``-bit code. Each row's codes are one
little-endian bit stream stored in ``uint32`` words: code ``k`` takes bits
``k*bits .. k*bits + bits-1`` of the row. For 4 bits, word ``j`` holds codes
``8j .. 8j+7``, code ``8j+i`` in bits ``4i .. 4i+3``; for 8 bits, word ``j``
holds codes ``4j .. 4j+3``, one byte each::

    codes   uint32           [out, in * bits / 32]
    scales  float16|float32  [out, in / group_size]
    biases  float16|float32  [out, in / group_size]

``QuantizedTensor.dequantize`` is the numpy reference: ``scales * q + biases``
in float32, one product then one sum, each rounded to float32. Scales and
biases are float16 where that holds them exactly (the GGUF formats whose
factors are float16 themselves), float32 otherwise.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from model.config import ModelConfig
from model.weights.canonical import expected_shapes

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)        # what MLX packs; GGUF files give 4 and 8
SUPPORTED_GROUP_SIZES = (32, 64, 128)      # what mx.quantized_matmul takes
_ROWS_PER_CHUNK = 1024                     # bounds the bit-stream temporaries of 3/5/6-bit codes


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight ``[out, in]`` in the affine group layout of the module docstring."""

    codes: np.ndarray        # uint32 [out, in * bits // 32]: each row a little-endian stream of codes
    scales: np.ndarray       # float16 | float32 [out, in // group_size]
    biases: np.ndarray       # same shape and dtype as scales; w = scales * q + biases
    bits: int                # bits per code (SUPPORTED_BITS; GGUF formats map to 4 or 8)
    group_size: int          # consecutive input values sharing one scale and bias
    source: str              # the file's encoding: a GGUF type name ("Q4_K") or "mlx-affine"
    is_exact: bool = True    # whether dequantize() equals the file's own dequantization bit for bit

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {self.group_size}")
        if self.codes.dtype != np.uint32 or self.codes.ndim != 2:
            raise ValueError(f"codes must be a 2-D uint32 array, got {self.codes.dtype} {self.codes.shape}")
        if self.scales.dtype not in (np.float16, np.float32) or self.biases.dtype != self.scales.dtype:
            raise ValueError(
                f"scales and biases must share a float16/float32 dtype, got {self.scales.dtype}, {self.biases.dtype}")
        out, words = self.codes.shape
        if (words * 32) % self.bits:
            raise ValueError(f"{words} words per row do not hold a whole number of {self.bits}-bit codes")
        groups = words * 32 // self.bits // self.group_size
        if self.scales.shape != (out, groups) or self.biases.shape != (out, groups):
            raise ValueError(
                f"codes {self.codes.shape} at {self.bits} bits and group {self.group_size} need scales and biases "
                f"of shape {(out, groups)}, got {self.scales.shape} and {self.biases.shape}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the dequantized weight."""
        return self.codes.shape[0], self.codes.shape[1] * 32 // self.bits

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales and biases."""
        return self.codes.nbytes + self.scales.nbytes + self.biases.nbytes

    def unpack(self) -> np.ndarray:
        """The codes one per byte, uint8 ``[out, in]``."""
        return unpack_codes(self.codes, self.bits, self.shape[1])

    def dequantize(self) -> np.ndarray:
        """The float32 weight ``[out, in]`` (the numpy reference of every backend's kernel)."""
        out, in_features = self.shape
        groups = in_features // self.group_size
        q = self.unpack().reshape(out, groups, self.group_size).astype(np.float32)   # [out, G, gs]
        scales = self.scales.astype(np.float32)[:, :, None]                          # [out, G, 1]
        biases = self.biases.astype(np.float32)[:, :, None]
        return (scales * q + biases).reshape(out, in_features)

    def take_rows(self, index: np.ndarray) -> QuantizedTensor:
        """The rows ``index`` (a permutation, or the tokens of an embedding lookup)."""
        return QuantizedTensor(
            np.ascontiguousarray(self.codes[index]), np.ascontiguousarray(self.scales[index]),
            np.ascontiguousarray(self.biases[index]), self.bits, self.group_size, self.source, self.is_exact,
        )

    def relayout(self, bits: int, group_size: int) -> QuantizedTensor:
        """The same values with wider codes and/or smaller groups (lossless).

        A ``b``-bit code is also a valid code of any wider width, and a group
        split in two keeps its scale and bias in both halves.
        """
        if bits < self.bits or group_size > self.group_size or self.group_size % group_size:
            raise ValueError(f"cannot re-lay {self.bits}-bit group-{self.group_size} codes "
                             f"as {bits}-bit group-{group_size} losslessly")
        if (bits, group_size) == (self.bits, self.group_size):
            return self
        split = self.group_size // group_size
        codes = self.codes if bits == self.bits else pack_codes(self.unpack(), bits)
        return QuantizedTensor(
            codes, np.repeat(self.scales, split, axis=1), np.repeat(self.biases, split, axis=1),
            bits, group_size, self.source, self.is_exact,
        )


def concat_rows(tensors: list[QuantizedTensor]) -> QuantizedTensor:
    """Stack weights along ``out`` (a fused qkv or gate_up), re-laid out to a common layout.

    The result takes the widest bits and the smallest group of the parts (see
    ``relayout``), so a Q4_K ``q_proj`` next to a Q6_K ``v_proj`` stays exact.
    """
    if len({t.shape[1] for t in tensors}) != 1:
        raise ValueError(f"cannot stack weights of different in_features: {[t.shape for t in tensors]}")
    bits = max(t.bits for t in tensors)
    group_size = min(t.group_size for t in tensors)
    parts = [t.relayout(bits, group_size) for t in tensors]
    float_dtype = np.result_type(*(p.scales.dtype for p in parts))
    sources = "+".join(dict.fromkeys(p.source for p in parts))
    return QuantizedTensor(
        np.concatenate([p.codes for p in parts]),
        np.concatenate([p.scales.astype(float_dtype) for p in parts]),
        np.concatenate([p.biases.astype(float_dtype) for p in parts]),
        bits, group_size, sources, all(p.is_exact for p in parts),
    )


def from_codes(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int,
               source: str, is_exact: bool = True) -> QuantizedTensor:
    """Pack uint8 codes ``[out, in]`` with float32 ``scales``/``biases`` ``[out, in / group_size]``.

    Scales and biases are stored as float16 when that loses nothing.
    """
    scales = np.ascontiguousarray(scales, dtype=np.float32)
    biases = np.ascontiguousarray(biases, dtype=np.float32)
    scales, biases = _narrowest(scales), _narrowest(biases)
    if scales.dtype != biases.dtype:
        scales, biases = scales.astype(np.float32), biases.astype(np.float32)
    return QuantizedTensor(pack_codes(codes, bits), scales, biases, bits, group_size, source, is_exact)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes ``[rows, in]`` (each < 2**bits) -> uint32 words ``[rows, in * bits / 32]``."""
    rows, in_features = codes.shape
    if (in_features * bits) % 32:
        raise ValueError(f"{in_features} codes of {bits} bits do not fill whole 32-bit words")
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        stream = codes
    elif 8 % bits == 0:                                   # 2, 4: whole codes per byte
        per_byte = 8 // bits
        grouped = codes.reshape(rows, -1, per_byte)       # [rows, bytes, per_byte]
        stream = np.zeros(grouped.shape[:2], dtype=np.uint8)
        for i in range(per_byte):
            stream |= grouped[:, :, i] << np.uint8(i * bits)
    else:                                                 # 3, 5, 6: codes straddle bytes
        bit_planes = np.unpackbits(codes[:, :, None], axis=2, count=bits, bitorder="little")  # [rows, in, bits]
        stream = np.packbits(bit_planes.reshape(rows, -1), axis=1, bitorder="little")
    return np.ascontiguousarray(stream).view("<u4").astype(np.uint32, copy=False)


def unpack_codes(words: np.ndarray, bits: int, in_features: int) -> np.ndarray:
    """uint32 words ``[rows, in * bits / 32]`` -> uint8 codes ``[rows, in]``."""
    rows = words.shape[0]
    stream = np.ascontiguousarray(words).astype("<u4", copy=False).view(np.uint8)   # [rows, in * bits / 8]
    if bits == 8:
        return stream[:, :in_features].copy()
    if 8 % bits == 0:
        shifts = (np.arange(8 // bits, dtype=np.uint8) * bits)[None, None, :]
        codes = (stream[:, :, None] >> shifts) & np.uint8((1 << bits) - 1)            # [rows, bytes, per_byte]
        return codes.reshape(rows, -1)[:, :in_features]
    out = np.empty((rows, in_features), dtype=np.uint8)
    for start in range(0, rows, _ROWS_PER_CHUNK):
        chunk = stream[start:start + _ROWS_PER_CHUNK]
        planes = np.unpackbits(chunk, axis=1, bitorder="little")[:, :in_features * bits]   # [chunk, in * bits]
        planes = planes.reshape(len(chunk), in_features, bits)
        out[start:start + len(chunk)] = np.packbits(planes, axis=2, bitorder="little")[:, :, 0]
    return out


def check_quantized_weights(config: ModelConfig, weights: dict, source: str) -> dict:
    """Like ``canonical.check_weights``, with ``QuantizedTensor`` allowed for 2-D weights.

    Float tensors come back float32 and C-contiguous; 1-D tensors (norms,
    biases) must be float. Raises ValueError naming what does not match.
    """
    shapes = expected_shapes(config)
    missing, extra = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
    if missing or extra:
        raise ValueError(f"{source}: weights do not match the config (missing {missing[:5]}, unexpected {extra[:5]})")
    out: dict = {}
    for name, shape in shapes.items():
        tensor = weights[name]
        if isinstance(tensor, QuantizedTensor) and len(shape) != 2:
            raise ValueError(f"{source}: {name} is quantized but only 2-D weights may be")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the config implies {shape}")
        out[name] = tensor if isinstance(tensor, QuantizedTensor) else np.ascontiguousarray(tensor, dtype=np.float32)
    return out


def backend_weight_shapes(config: ModelConfig, weights: dict) -> dict[str, tuple[int, ...]]:
    """``expected_shapes`` plus an ``lm_head.weight`` a tied checkpoint still carries (checked, not used)."""
    shapes = expected_shapes(config)
    if "lm_head.weight" in weights:
        shapes.setdefault("lm_head.weight", (config.vocab_size, config.hidden_size))
    return shapes


def checked_weight(weights: dict, shapes: dict[str, tuple[int, ...]], name: str) -> np.ndarray | QuantizedTensor:
    """``weights[name]`` (a numpy array, or a ``QuantizedTensor`` as it is) of shape ``shapes[name]``.

    What every backend's weight preparation reads through; raises
    ``ValueError`` naming a missing or mis-shaped tensor.
    """
    if name not in weights:
        raise ValueError(f"weight {name!r} is missing")
    tensor = weights[name]
    if not isinstance(tensor, QuantizedTensor):
        tensor = np.asarray(tensor)
    if tuple(tensor.shape) != shapes[name]:
        raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {shapes[name]}")
    return tensor


def weight_format(weights: dict) -> str:
    """What ``weights`` hold, most tensors first: ``"float32"``, ``"Q4_1+Q8_0"``, ``"mlx-affine"``, ..."""
    counts = Counter(t.source for t in weights.values() if isinstance(t, QuantizedTensor))
    return "+".join(source for source, _ in counts.most_common()) or "float32"


def weight_nbytes(weights: dict) -> int:
    """Bytes held by ``weights`` as they are (quantized tensors at their packed size)."""
    return sum(int(t.nbytes) for t in weights.values())


def dequantize_all(weights: dict) -> dict[str, np.ndarray]:
    """``weights`` with every ``QuantizedTensor`` replaced by its float32 values."""
    return {name: t.dequantize() if isinstance(t, QuantizedTensor) else t for name, t in weights.items()}


def _narrowest(values: np.ndarray) -> np.ndarray:
    """``values`` as float16 if that round-trips every element exactly, else unchanged (float32)."""
    with np.errstate(over="ignore"):
        narrow = values.astype(np.float16)
    return narrow if np.array_equal(narrow.astype(np.float32), values) else values
