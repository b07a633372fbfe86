"""GGUF block quantizations re-laid out, without dequantizing, as ``QuantizedTensor``.

A GGUF matrix ``[out, in]`` is quantized in blocks of consecutive values along
``in``; each format below is an affine group of 32 (``model.weights.quant``):

=======  ==========================================  =========================  ==========
format   the file's value (``q`` unsigned)            packed as (group 32)       exact?
=======  ==========================================  =========================  ==========
Q4_0     ``d * (q - 8)``                              4 bit, ``d``, ``-8d``      yes
Q4_1     ``d * q + m``                                4 bit, ``d``, ``m``        yes
Q5_0     ``d * (q - 16)``                             8 bit, ``d``, ``-16d``     yes
Q5_1     ``d * q + m``                                8 bit, ``d``, ``m``        yes
Q8_0     ``d * s`` (``s`` int8)                       8 bit ``s + 128``,         yes
                                                      ``d``, ``-128d``
Q4_K     super-block of 256: sub-block ``j`` of 32    4 bit, ``d*sc_j``,         yes
         is ``(d*sc_j) * q - dmin*m_j`` (6-bit        ``-dmin*m_j``
         ``sc_j``, ``m_j``; float16 ``d``, ``dmin``)
Q5_K     as Q4_K with 5-bit ``q``                     8 bit, as Q4_K             yes
Q6_K     super-block of 256 in 16 sub-blocks of 16:   8 bit, requantized         no (below)
         ``(d*sc_j) * (q - 32)``, int8 ``sc_j``
=======  ==========================================  =========================  ==========

"exact" means ``QuantizedTensor.dequantize`` gives, bit for bit, what
``gguf.quants.dequantize`` gives: the scale and bias are float32 products of
a float16 and an integer of at most 8 bits, ``scale * q`` has at most 24
significant bits, so it is exact, and the one rounding left is the final sum,
the same rounding the file's own formula makes. Q5_0, Q5_1 and Q5_K widen
their 5-bit codes to 8 bits (a lossless re-layout: 8 bits per value instead
of 5.5-6), since the layout's kernels take 4 and 8 bits.

Q6_K does not map exactly: its groups are 16 values (MLX takes groups of 32
at least) and two neighbouring groups have unrelated scales ``d*A`` and
``d*B``, so no 8-bit grid holds both in general. ``_q6_k`` requantizes each
pair to one 8-bit group: its step is a quarter of the step of the sub-block
with the larger ``|sc|`` (say ``A``), ``s = d*A/4``, whose values
``d*A*(q-32) = s*(4q - 128)`` stay exact; the other sub-block's values are
rounded to that grid, an error of at most ``|s|/2`` (an eighth of the larger
step), or ``|s|`` for the one value that would need code 256 (``B = -A``,
``q = 0``). Measured on weights drawn from a normal and a Student-t(3)
distribution and quantized to Q6_K by rounding to nearest
(tests/model/test_quant_formats.py): about half the values stay exact, and the
RMS error the requantization adds is 20-23% of the RMS error of the Q6_K
quantization itself, so the total error grows by about 2.5% (0.4-0.6% of the
weights' RMS), for 8 bits per value instead of 6.56.

Other types (F32, F16, BF16, Q2_K, Q3_K, the IQ formats) are not kept:
``pack_tensor`` returns None for them and the reader dequantizes them to float32.
"""

from __future__ import annotations

import numpy as np

from model.weights.quant import QuantizedTensor, from_codes

GROUP = 32   # the group size of every GGUF-derived tensor
# ggml type name -> (values per block, bytes per block) of the types kept quantized
BLOCK_SIZES = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}


def pack_tensor(tensor) -> QuantizedTensor | None:
    """A ``gguf.ReaderTensor`` matrix in the packed layout, or None where its type is not kept."""
    qtype = tensor.tensor_type.name
    if qtype not in BLOCK_SIZES or len(tensor.shape) != 2:
        return None
    out, in_features = (int(n) for n in reversed(tensor.shape))   # ggml ne is innermost-first
    return pack_blocks(np.asarray(tensor.data), qtype, (out, in_features))


def pack_blocks(data: np.ndarray, qtype: str, shape: tuple[int, int]) -> QuantizedTensor:
    """The raw bytes ``data`` of a matrix of ggml type ``qtype`` and ``shape`` ``[out, in]``, packed."""
    block_size, type_size = BLOCK_SIZES[qtype]
    out, in_features = shape
    if in_features % block_size:
        raise ValueError(f"a {qtype} row of {in_features} values is not a whole number of {block_size}-value blocks")
    if data.size != out * in_features // block_size * type_size:
        raise ValueError(f"{qtype} data of {data.size} bytes does not hold a {shape} matrix")
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, type_size)         # [n_blocks, type_size]
    codes, scales, biases, bits, is_exact = PACKERS[qtype](blocks)
    return from_codes(codes.reshape(out, in_features), scales.reshape(out, -1), biases.reshape(out, -1),
                      bits, GROUP, qtype, is_exact)


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at byte ``offset`` of every block, as float32 ``[n]``."""
    return np.ascontiguousarray(blocks[:, offset:offset + 2]).view(np.float16)[:, 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes ``[..., 32*c]`` holding two 4-bit codes each -> codes ``[..., c, 2, 32]``.

    Chunk ``c`` of 32 bytes carries 64 values: the low nibbles are the first
    32, the high nibbles the next 32 (the order of every GGUF 4-bit format).
    """
    chunks = qs.reshape(*qs.shape[:-1], -1, 32)                                       # [..., c, 32]
    return np.stack([chunks & np.uint8(0x0F), chunks >> np.uint8(4)], axis=-2)        # [..., c, 2, 32]


def _q4_0(blocks):
    d = _f16(blocks, 0)                                                               # [n]
    return _legacy_nibbles(blocks[:, 2:18]), d, -8 * d, 4, True


def _legacy_nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 codes: values 0-15 in the low nibbles, 16-31 in the high ones."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)           # [n, 32]


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """The 4-byte ``qh`` of a Q5_0/Q5_1 block -> bit 4 of its 32 codes, ``[n, 32]``."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little")        # bit j of the u32 is code j's


def _q4_1(blocks):
    return _legacy_nibbles(blocks[:, 4:20]), _f16(blocks, 0), _f16(blocks, 2), 4, True


def _q5_0(blocks):
    d = _f16(blocks, 0)
    codes = _legacy_nibbles(blocks[:, 6:22]) | (_fifth_bits(blocks[:, 2:6]) << np.uint8(4))
    return codes, d, -16 * d, 8, True


def _q5_1(blocks):
    codes = _legacy_nibbles(blocks[:, 8:24]) | (_fifth_bits(blocks[:, 4:8]) << np.uint8(4))
    return codes, _f16(blocks, 0), _f16(blocks, 2), 8, True


def _q8_0(blocks):
    d = _f16(blocks, 0)
    codes = blocks[:, 2:34] ^ np.uint8(0x80)                                          # int8 s -> s + 128
    return codes, d, -128 * d, 8, True


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 scale bytes of a Q4_K/Q5_K block -> 6-bit ``(sc, m)``, each ``[n, 8]``.

    Sub-blocks 0-3 keep their scale and min in the low 6 bits of bytes 0-3
    and 4-7; sub-blocks 4-7 put their low 4 bits in bytes 8-11 (scale low
    nibble, min high nibble) and their top 2 bits in the spare top bits of
    bytes 0-3 (scale) and 4-7 (min).
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]                        # [n, 4] each
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    m = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc.astype(np.float32), m.astype(np.float32)


def _k_affine(blocks):
    """Per-32 ``(scale, bias)`` ``[n, 8]`` of a Q4_K/Q5_K block: ``(d*sc, -dmin*m)``."""
    d, dmin = _f16(blocks, 0)[:, None], _f16(blocks, 2)[:, None]
    sc, m = _k_scales(blocks[:, 4:16])
    return d * sc, -(dmin * m)


def _q4_k(blocks):
    codes = _nibbles(blocks[:, 16:144]).reshape(-1, 256)     # chunk c -> sub-blocks 2c (low), 2c+1 (high)
    scales, biases = _k_affine(blocks)
    return codes, scales, biases, 4, True


def _q5_k(blocks):
    low = _nibbles(blocks[:, 48:176]).reshape(-1, 8, 32)                              # [n, 8, 32]
    qh = blocks[:, 16:48]                                                             # [n, 32]: bit j -> sub-block j
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & np.uint8(1)
    scales, biases = _k_affine(blocks)
    return (low | (high << np.uint8(4))).reshape(-1, 256), scales, biases, 8, True


def _q6_k(blocks):
    """Q6_K requantized to 8-bit groups of 32 (see the module docstring for the error)."""
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(n, 2, 64)                  # per half of 128 values
    qh = blocks[:, 128:192].reshape(n, 2, 32)
    sub = blocks[:, 192:208].view(np.int8).astype(np.int32)  # [n, 16] signed sub-block scales
    d = _f16(blocks, 208)                                    # [n]
    # half h, quarter k (32 values each): low 4 bits from ql (bytes 0-31 / 32-63, low then high nibble),
    # high 2 bits from qh bits 2k, 2k+1
    low = np.concatenate([ql & np.uint8(0x0F), ql >> np.uint8(4)], axis=2).reshape(n, 2, 4, 32)
    high = (qh[:, :, None, :] >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & np.uint8(3)
    q = (low | (high << np.uint8(4))).reshape(n, 8, 2, 16).astype(np.int32) - 32     # [n, group, half, 16]
    pair = sub.reshape(n, 8, 2)                                                       # [n, group, half]
    use_first = np.abs(pair[..., 0]) >= np.abs(pair[..., 1])
    big = np.where(use_first, pair[..., 0], pair[..., 1])                              # [n, group]: the larger |sc|
    safe = np.where(big == 0, 1, big)[..., None, None]
    # code 128 + 4 * (sc / big) * (q - 32): exactly 4q in the larger sub-block, rounded in the other
    codes = np.rint(4.0 * pair[..., None] * q / safe) + 128                            # [n, group, half, 16]
    codes = np.clip(codes, 0, 255).astype(np.uint8).reshape(n, 256)
    scales = d[:, None] * big.astype(np.float32) / np.float32(4)                       # [n, 8]
    return codes, scales, -128 * scales, 8, False


PACKERS = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}
