"""The cpu backend's GEMM helpers: ``cpu_linear`` and the oneDNN prepacked ``OneDNNLinear``.

Every projection of the torch model (``backends.torch_model.model``) goes
through one of these, with ``F.linear``'s signature (``x [T, in]``,
``w [out, in]``, optional bias -> ``[T, out]``):

- ``cpu_linear`` picks, per call, the fastest way torch/MKL (or the native
  GEMMs) has for the shape: the native small-batch GEMM up to
  ``NATIVE_MAX_ROWS`` rows, the transposed-view orientation for skinny
  products, ``F.linear`` for long ones. Where "long" starts depends on the
  CPU (MKL takes other paths on other vendors): ``choose_contiguous_min_rows``
  measures it on a model's own weights when the cpu backend starts. Up to
  ``NATIVE_GEMM_MAX_ROWS`` rows (batched decode, short chunks) the native
  batched GEMM runs instead, unless ``choose_native_max_rows`` finds BLAS
  faster on this machine.
- ``OneDNNLinear`` runs products of more than ``NATIVE_MAX_ROWS`` rows
  against weights reordered once, at load, into oneDNN's blocked layout
  (``torch.ops.mkldnn``). On this machine kind (AMD, AVX2) MKL is weak at
  batch-64 decode shapes and at the wide LM head, and each call would
  otherwise re-pack the weight; the output is contiguous. Few rows stay on
  ``cpu_linear`` (the native GEMM streams plain weights faster), so the plain
  float32 weights are kept: the packed copies cost as much memory again
  (``OneDNNLinear.packed_bytes``). float32 only (oneDNN's bfloat16 needs
  AVX512-BF16 / AVX-NE-CONVERT, which this path does not require).

It is opt-in: ``PAGEDGEN_CPU_ONEDNN=1`` (read by ``onednn_enabled``; the
default 0 keeps ``cpu_linear`` for everything). Besides the packed copy,
oneDNN caches one primitive per distinct row count and shape, so a server
seeing many step shapes grows by tens to hundreds of MiB until its primitive
cache is full (``tests/service/test_soak.py`` measured +117 MiB in its
second half); it gains ~4% on the batch-64 benchmark here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from backends.cpu.native import decode_ops
from backends.cpu.native.ops import alternating_medians
from common import envs

if TYPE_CHECKING:
    from backends.torch_model.weights import ModelWeights

# Weights with more output rows than this (the LM head) are multiplied in row
# blocks of this size, each transposed into the output while still in cache.
LINEAR_ROW_BLOCK = 2048
# Products of this many rows or more (prefill chunks) use F.linear: its
# contiguous [T, out] output makes the following residual adds, RoPE and
# SwiGLU ~25% cheaper per prefill step than reading the transposed view.
# The default, measured on an AVX2 EPYC; choose_contiguous_min_rows may lower
# it for a machine (an AVX-512 Xeon: batch-64 decode steps 155 -> 144 ms).
CONTIGUOUS_MIN_ROWS = 256
# The lower thresholds choose_contiguous_min_rows tries, in order.
CONTIGUOUS_CANDIDATE_ROWS = (32, 64, 128)
# float32 products of at most this many rows (decode steps) run in the native
# small-batch GEMM (backends/cpu/native/decode_ops.c) where it was built: it
# streams the weight once at close to the memory bandwidth (MKL: ~60% of it at
# 1-2 rows) into a contiguous output.
NATIVE_MAX_ROWS = 8
# ... and up to this many in the native batched GEMM (gemm.c: batched decode,
# short prefill chunks), which reads the weights in place where BLAS packs
# them on every call: a batch-64 decode step's projections and LM head,
# streamed from memory, 85 -> 57 ms on a 2-core AVX-512 Xeon. Past ~200 rows
# MKL's blocking wins (at 256 rows they are even there). choose_native_max_rows
# turns the batched GEMM off on a machine where it is not faster.
NATIVE_GEMM_MAX_ROWS = 192
# The batch size oneDNN is told to expect when it picks the weights' blocked
# layout; any row count runs against it. Measured here at 64 and 2048 rows
# on the model's shapes, 2048 was as fast or faster at both.
ONEDNN_PACK_ROWS = 2048
# The variable that turns OneDNNLinear off (common.envs).
ONEDNN_SWITCH = "PAGEDGEN_CPU_ONEDNN"

Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def cpu_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
               upcast_min_rows: int | None = None, contiguous_min_rows: int = CONTIGUOUS_MIN_ROWS,
               native_max_rows: int = NATIVE_GEMM_MAX_ROWS) -> torch.Tensor:
    """``F.linear(x, w, bias)``, for few rows as the view ``(w @ x.T).T`` ``[T, out]``.

    On CPU, MKL runs skinny GEMMs (few tokens, a large weight) in this
    orientation 1.3-3x faster than ``F.linear``'s; from ``CONTIGUOUS_MIN_ROWS``
    rows on (``contiguous_min_rows``), plain ``F.linear`` is as fast and its output contiguous; a single
    row is padded to
    two because the GEMV path streams the weight slower than a 2-row GEMM.
    Wide weights (the LM head) are done in row blocks into a contiguous
    output: transposing a whole ``[vocab, T]`` product afterwards costs as
    much as the GEMM. With ``upcast_min_rows``, bfloat16 products of at least
    that many rows run in float32 (CPUs without native bfloat16 emulate it
    several times slower than converting the weight on the fly). float32
    products of up to ``native_max_rows`` rows (``NATIVE_GEMM_MAX_ROWS``; at least ``NATIVE_MAX_ROWS``)
    use the native GEMMs when they are available.
    """
    if x.shape[0] <= max(native_max_rows, NATIVE_MAX_ROWS) and x.dtype == torch.float32 and x.dim() == 2 \
            and x.stride(1) == 1 and w.is_contiguous() and (bias is None or bias.is_contiguous()):
        ops = decode_ops()
        if ops is not None:
            return ops.linear(x, w, bias)                                              # [T, out]
    if upcast_min_rows is not None and x.dtype == torch.bfloat16 and x.shape[0] >= upcast_min_rows:
        b = None if bias is None else bias.float()
        return cpu_linear(x.float(), w.float(), b, None, contiguous_min_rows,
                          native_max_rows).to(torch.bfloat16)                          # [T, out]
    if x.shape[0] == 1:
        return cpu_linear(torch.cat((x, x)), w, bias, None, contiguous_min_rows, native_max_rows)[:1]  # [1, out]
    if x.shape[0] >= contiguous_min_rows:
        return F.linear(x, w, bias)                                                    # [T, out]
    if w.shape[0] > 2 * LINEAR_ROW_BLOCK:
        out = x.new_empty((x.shape[0], w.shape[0]))                                    # [T, out]
        for start in range(0, w.shape[0], LINEAR_ROW_BLOCK):
            end = start + LINEAR_ROW_BLOCK
            b = None if bias is None else bias[start:end]
            out[:, start:end] = cpu_linear(x, w[start:end], b, upcast_min_rows, contiguous_min_rows,
                                           native_max_rows)                            # [T, block]
        return out
    if bias is None:
        return torch.mm(w, x.t()).t()                                                  # [T, out]
    return torch.addmm(bias[:, None], w, x.t()).t()                                    # [T, out]


def choose_contiguous_min_rows(weights: Sequence[torch.Tensor], passes: int = 3) -> tuple[int, dict[str, float]]:
    """From how many rows ``cpu_linear`` should use ``F.linear`` on this machine, measured on ``weights``
    (float32 ``[out, in]``: one decoder layer's projections is enough).

    For each of ``CONTIGUOUS_CANDIDATE_ROWS`` in turn, times the products both ways
    (``alternating_medians``): ``F.linear`` against the transposed view plus the copy that makes it
    contiguous (what the layer's next ops pay to read it). The first row count where ``F.linear``
    reaches 90% of the view's rate wins: the copy alone understates what the view costs the rest of the
    layer. None wins: ``CONTIGUOUS_MIN_ROWS``. Returns the threshold and the measured rates (GFLOP/s).
    """
    weights = [w for w in weights if w.dim() == 2 and w.dtype == torch.float32 and w.is_contiguous()]
    rates: dict[str, float] = {}
    for rows in CONTIGUOUS_CANDIDATE_ROWS:
        xs = {w.shape[1]: torch.ones(rows, w.shape[1]) for w in weights}
        seconds = alternating_medians({
            "linear": lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
            "view": lambda: [torch.mm(w, xs[w.shape[1]].t()).t().contiguous() for w in weights]}, passes)
        flop = sum(2 * rows * w.shape[0] * w.shape[1] for w in weights)
        for way, s in seconds.items():
            rates[f"{way}_{rows}_gflops"] = round(flop / s / 1e9, 1)
        if rates[f"linear_{rows}_gflops"] >= 0.9 * rates[f"view_{rows}_gflops"]:
            return rows, rates
    return CONTIGUOUS_MIN_ROWS, rates


def choose_native_max_rows(weights: Sequence[torch.Tensor], contiguous_min_rows: int = CONTIGUOUS_MIN_ROWS,
                           rows: int = 64, passes: int = 3) -> tuple[int, dict[str, float]]:
    """Up to how many rows ``cpu_linear`` should use the native GEMMs on this machine, measured on
    ``weights`` (float32 ``[out, in]``, in the order a step reads them: a model's projections, enough of
    them to stream from memory rather than from cache).

    Times ``rows``-row products over ``weights`` in the native batched GEMM and in BLAS (``cpu_linear``
    as it would run them otherwise, with ``contiguous_min_rows``), alternating (``alternating_medians``):
    ``NATIVE_GEMM_MAX_ROWS`` where the native GEMM is at least as fast, else ``NATIVE_MAX_ROWS`` (only
    decode steps of a few rows stay native). Returns the threshold and both rates (GFLOP/s); without the
    native library, ``NATIVE_MAX_ROWS`` and no rates.
    """
    ops = decode_ops()
    weights = [w for w in weights if w.dim() == 2 and w.dtype == torch.float32 and w.is_contiguous()]
    if ops is None or not weights:
        return NATIVE_MAX_ROWS, {}
    xs = {w.shape[1]: torch.ones(rows, w.shape[1]) for w in weights}
    seconds = alternating_medians({
        "native": lambda: [ops.linear(xs[w.shape[1]], w) for w in weights],
        "blas": lambda: [cpu_linear(xs[w.shape[1]], w, None, None, contiguous_min_rows, NATIVE_MAX_ROWS)
                         for w in weights]}, passes)
    flop = sum(2 * rows * w.shape[0] * w.shape[1] for w in weights)
    rates = {f"{way}_{rows}_gflops": round(flop / s / 1e9, 1) for way, s in seconds.items()}
    return (NATIVE_GEMM_MAX_ROWS if seconds["native"] <= seconds["blas"] else NATIVE_MAX_ROWS), rates


# The LayerWeights fields the model multiplies through its linear (2-D; experts are 3-D and stay plain).
PROJECTIONS = ("qkv", "o_proj", "gate_up", "down", "router", "shared_gate_up", "shared_down", "shared_gate")


def projections(weights: "ModelWeights") -> list[torch.Tensor]:
    """Every projection weight of ``weights`` the model passes to its linear, the LM head last."""
    out = [getattr(layer, name) for layer in weights.layers for name in PROJECTIONS]
    return [w for w in out if w is not None] + [weights.lm_head]


def onednn_enabled() -> bool:
    """``PAGEDGEN_CPU_ONEDNN`` (default off; ``common.envs``)."""
    return envs.get_bool(ONEDNN_SWITCH)


def onednn_available() -> bool:
    """Whether this torch has oneDNN on this CPU and the prepacked linear ops it exposes."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


class OneDNNLinear:
    """``cpu_linear`` with the products of more than ``min_rows`` rows against prepacked weights.

    ``pack(weights)`` reorders each float32 2-D CPU weight once (those given
    twice, a tied LM head, once); a call with a packed weight and more than
    ``min_rows`` float32 rows runs ``torch.ops.mkldnn._linear_pointwise``
    (contiguous ``[T, out]``); every other call, and a weight not packed (a
    slice, a quantized or bfloat16 weight), goes to ``fallback``. Weights are
    looked up by identity: the model passes the very tensors it was built with.
    """

    def __init__(self, fallback: Linear = cpu_linear, min_rows: int = NATIVE_MAX_ROWS,
                 pack_rows: int = ONEDNN_PACK_ROWS) -> None:
        if not onednn_available():
            raise RuntimeError("this torch build has no oneDNN linear ops (torch.ops.mkldnn) on this CPU")
        if min_rows < 0 or pack_rows < 1:
            raise ValueError(f"min_rows must be >= 0 and pack_rows >= 1, got {min_rows}, {pack_rows}")
        self.fallback = fallback
        self.min_rows = min_rows
        self.pack_rows = pack_rows
        self._packed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # id(w) -> (w, packed w)
        self.packed_bytes = 0

    def pack(self, weights: Iterable[torch.Tensor | None]) -> int:
        """Reorder every packable weight of ``weights`` (others are skipped); returns how many were packed."""
        count = 0
        for w in weights:
            if (not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype != torch.float32 or not w.is_cpu
                    or id(w) in self._packed):
                continue
            packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), self.pack_rows)  # opaque, [out, in]
            self._packed[id(w)] = (w, packed)
            self.packed_bytes += w.numel() * w.element_size()
            count += 1
        return count

    def clear(self) -> None:
        """Drop the packed copies."""
        self._packed.clear()
        self.packed_bytes = 0

    def __call__(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] > self.min_rows and x.dtype == torch.float32 and \
                (bias is None or bias.dtype == torch.float32):
            entry = self._packed.get(id(w))
            if entry is not None and entry[0] is w:
                return torch.ops.mkldnn._linear_pointwise(x, entry[1], bias, "none", [], "")   # [T, out]
        return self.fallback(x, w, bias)
