"""ctypes bindings of ``decode_ops.c`` (with ``gemm.c``): the GEMMs and fused elementwise operators (float32).

``DecodeOps`` is what the cpu backend hands the torch model
(``LlamaModel(ops=...)``) and its sampler (``argmax``): each method computes
what the torch expression in its docstring computes (summation order aside),
checks its inputs and writes a fresh contiguous tensor (``rope`` works in
place on the GEMM output it is given). Callers decide when to use them: the
GEMM and the layer-sized calls pay off at a few rows (``max_rows``), where a
torch op costs more in dispatch than in arithmetic and the BLAS streams a
skinny product's weight below the memory bandwidth, and up to a batched
decode step (``backends.cpu.linear.NATIVE_GEMM_MAX_ROWS``), where the BLAS
packs the weight on every call; the elementwise ones at
any size (one pass over memory instead of several). ``attn_in`` and ``mlp_block`` chain those operators for a
whole decoder layer in two calls that write caller-owned buffers
(``mlp_scratch``): at one row each ctypes call or fresh tensor costs a few
microseconds, a tenth of a layer's arithmetic.
"""

from __future__ import annotations

import ctypes
import time
from typing import TYPE_CHECKING, Callable, Sequence

import torch

if TYPE_CHECKING:
    from backends.cpu.native.layer import DecodeLayers

_i32 = ctypes.c_int32
_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p
_f32 = ctypes.c_float

# Decode steps of at most this many token rows use the fused operators.
MAX_ROWS = 8


def alternating_medians(ways: dict[str, Callable[[], object]], passes: int = 3) -> dict[str, float]:
    """The median seconds of each of ``ways`` over ``passes`` rounds that run them in turn, after one
    warm-up round: alternating keeps a busy machine's slow spells from landing on one way only."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(passes + 1):
        for name, run in ways.items():
            t0 = time.perf_counter()
            run()
            if round_:
                times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def _check(name: str, t: torch.Tensor, rows_strided: bool = False) -> None:
    """``t`` must be float32 on the CPU, contiguous (or, with ``rows_strided``, rows of contiguous elements)."""
    if t.dtype != torch.float32 or not t.is_cpu:
        raise ValueError(f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    ok = (t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1]) if rows_strided else t.is_contiguous()
    if not ok:
        raise ValueError(f"{name} must be {'a 2-D tensor with contiguous rows' if rows_strided else 'contiguous'}"
                         f" (shape {tuple(t.shape)}, strides {t.stride()}); call .contiguous() first")


class DecodeOps:
    """The operators of one loaded ``decode_ops`` library; ``num_threads`` defaults to torch's."""

    max_rows = MAX_ROWS

    def __init__(self, library: ctypes.CDLL) -> None:
        self._library = library
        self._linear = library.pagedgen_linear_f32
        self._linear.argtypes = [_ptr, _i64, _ptr, _ptr, _ptr, _i32, _i32, _i32, _i32]
        self._norm = library.pagedgen_add_rms_norm_f32
        self._norm.argtypes = [_ptr, _ptr, _ptr, _ptr, _ptr, _i32, _i32, _f32]
        self._rope = library.pagedgen_rope_f32
        self._rope.argtypes = [_ptr, _i64, _ptr, _ptr, _i32, _i32, _i32, _i32]
        self._silu_mul = library.pagedgen_silu_mul_f32
        self._silu_mul.argtypes = [_ptr, _ptr, _i32, _i32]
        self._attn_in = library.pagedgen_attn_in_f32
        self._attn_in.argtypes = [_ptr, _ptr, _ptr, _f32, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr] + [_i32] * 7
        self._mlp_block = library.pagedgen_mlp_block_f32
        self._mlp_block.argtypes = [_ptr, _ptr, _ptr, _ptr, _f32] + [_ptr] * 8 + [_i32] * 5
        self._argmax = library.pagedgen_argmax_f32
        self._argmax.argtypes = [_ptr, _i64, _i32, _i32, _ptr]
        self._set_prefetch = library.pagedgen_set_weight_prefetch
        self._set_prefetch.argtypes = [_i32]
        for fn in (self._linear, self._norm, self._rope, self._silu_mul, self._attn_in, self._mlp_block,
                   self._argmax, self._set_prefetch):
            fn.restype = ctypes.c_int

    def choose_weight_prefetch(self, weights: Sequence[torch.Tensor], passes: int = 3) -> dict[str, float | bool]:
        """Time one-row products over ``weights`` (a model's projections, in the order a decode step reads
        them; big enough to stream from memory, not from cache) with the GEMM's weight prefetches off and
        on (``alternating_medians``), and keep them on only where that is clearly (10%) faster: they help
        some memory systems and cost others two thirds of the read rate (decode_ops.c); the results are
        the same either way. Returns the decision and both read rates (GB/s, the median pass)."""
        weights = [w for w in weights if w.dim() == 2 and w.dtype == torch.float32 and w.is_contiguous()]
        xs = {w.shape[1]: torch.ones(1, w.shape[1]) for w in weights}

        def read_all(on: bool) -> Callable[[], None]:
            def run() -> None:
                self.set_weight_prefetch(on)
                for w in weights:
                    self.linear(xs[w.shape[1]], w)
            return run

        seconds = alternating_medians({"off": read_all(False), "on": read_all(True)}, passes)
        prefetch = seconds["on"] < 0.9 * seconds["off"]
        self.set_weight_prefetch(prefetch)
        total = sum(w.numel() * 4 for w in weights)
        return {"prefetch": prefetch, "off_gbps": round(total / seconds["off"] / 1e9, 1),
                "on_gbps": round(total / seconds["on"] / 1e9, 1)}

    def set_weight_prefetch(self, on: bool) -> None:
        """Switch the GEMM's weight prefetches on or off for later calls (``choose_weight_prefetch`` measures)."""
        self._set_prefetch(int(on))

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
               num_threads: int | None = None) -> torch.Tensor:
        """``F.linear(x, w, bias)``: ``x`` ``[M, K]`` (contiguous rows), ``w`` ``[N, K]`` -> ``[M, N]`` contiguous.

        Up to ``max_rows`` rows the small-batch GEMM (decode_ops.c: weight streams far apart), beyond
        the batched one (gemm.c: register tiles of 64 rows, x transposed once), as in ``attn_in`` and
        ``mlp_block``; any M works, but past ~200 rows BLAS is faster
        (``backends.cpu.linear.NATIVE_GEMM_MAX_ROWS``)."""
        _check("x", x, rows_strided=True)
        _check("w", w)
        if w.dim() != 2 or w.shape[1] != x.shape[1]:
            raise ValueError(f"w must be [out, {x.shape[1]}] for x of shape {tuple(x.shape)}, got {tuple(w.shape)}")
        if bias is not None:
            _check("bias", bias)
            if bias.shape != (w.shape[0],):
                raise ValueError(f"bias must be [{w.shape[0]}], got {tuple(bias.shape)}")
        out = x.new_empty((x.shape[0], w.shape[0]))                                       # [M, N]
        if x.shape[0]:
            self._linear(x.data_ptr(), x.stride(0), w.data_ptr(), None if bias is None else bias.data_ptr(),
                         out.data_ptr(), x.shape[0], w.shape[0], w.shape[1], num_threads or torch.get_num_threads())
        return out

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``s = x + delta``, ``F.rms_norm(s, weight, eps)`` for ``[M, n]``; without ``delta`` ``s`` is ``x``."""
        _check("x", x)
        _check("weight", weight)
        n = x.shape[-1]
        if weight.shape != (n,):
            raise ValueError(f"weight must be [{n}], got {tuple(weight.shape)}")
        if delta is not None:
            _check("delta", delta)
            if delta.shape != x.shape:
                raise ValueError(f"delta must have x's shape {tuple(x.shape)}, got {tuple(delta.shape)}")
        rows = x.numel() // n
        out = torch.empty_like(x)                                                        # [..., n]
        total = x if delta is None else torch.empty_like(x)                              # [..., n]
        if rows:
            self._norm(x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                       total.data_ptr(), out.data_ptr(), rows, n, eps)
        return total, out

    def rope_(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
              head_dim: int) -> torch.Tensor:
        """``apply_rope`` in place on the first ``num_heads`` heads of each row of ``qkv`` ``[T, >= heads * D]``.

        ``cos`` / ``sin`` are ``[T, 1, R/2]`` (or ``[T, R/2]``), ``R <= head_dim``.
        """
        _check("qkv", qkv, rows_strided=True)
        _check("cos", cos)
        _check("sin", sin)
        half = cos.shape[-1]
        if cos.numel() != qkv.shape[0] * half or sin.shape != cos.shape:
            raise ValueError(f"cos and sin must be [{qkv.shape[0]}, 1, R/2], got {tuple(cos.shape)}, {tuple(sin.shape)}")
        if 2 * half > head_dim or num_heads * head_dim > qkv.shape[1]:
            raise ValueError(f"{num_heads} heads of {head_dim} dims (rotary {2 * half}) do not fit rows of {qkv.shape[1]}")
        if qkv.shape[0]:
            self._rope(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), qkv.shape[0], num_heads,
                       head_dim, half)
        return qkv

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``F.silu(gate) * up`` with ``gate, up = gate_up.chunk(2, -1)``: ``[M, 2 * n]`` -> ``[M, n]``."""
        _check("gate_up", gate_up)
        if gate_up.dim() != 2 or gate_up.shape[1] % 2:
            raise ValueError(f"gate_up must be [M, 2 * n], got {tuple(gate_up.shape)}")
        out = gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))                # [M, n]
        if gate_up.shape[0]:
            self._silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.shape[0], out.shape[1])
        return out

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits.argmax(-1)`` of ``[M, V]`` (contiguous rows) as int64 ``[M]``: the first maximum of each
        row, the first NaN where there is one, as torch answers; threaded over rows (a batch's logits)."""
        _check("logits", logits, rows_strided=True)
        out = torch.empty(logits.shape[0], dtype=torch.int64)                              # [M]
        if logits.shape[0] and logits.shape[1]:
            self._argmax(logits.data_ptr(), logits.stride(0), logits.shape[0], logits.shape[1], out.data_ptr())
        elif logits.shape[0]:
            raise ValueError("argmax of rows with no elements")
        return out

    def attn_in(self, x: torch.Tensor, delta: torch.Tensor | None, norm_w: torch.Tensor, eps: float,
                w_qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                rope_heads: int, head_dim: int, sum_out: torch.Tensor, h: torch.Tensor,
                qkv: torch.Tensor) -> None:
        """``add_rms_norm`` -> ``linear`` (+ bias) -> ``rope_`` in one call, into the given buffers.

        ``x``, ``delta``, ``sum_out``, ``h`` ``[M, hidden]`` (``sum_out`` may be ``x``; without ``delta``
        it is not written), ``w_qkv`` ``[n_qkv, hidden]``, ``qkv`` ``[M, n_qkv]``, ``cos`` / ``sin``
        ``[M, 1, R/2]``; all contiguous float32.
        """
        m, hidden = x.shape
        n_qkv = w_qkv.shape[0]
        half = cos.shape[-1]
        tensors = (x, norm_w, w_qkv, cos, sin, sum_out, h, qkv) + tuple(t for t in (delta, bias) if t is not None)
        _check_all(tensors)
        if (w_qkv.shape != (n_qkv, hidden) or h.shape != x.shape or sum_out.shape != x.shape
                or qkv.shape != (m, n_qkv) or cos.numel() != m * half or sin.shape != cos.shape
                or (delta is not None and delta.shape != x.shape) or norm_w.shape != (hidden,)
                or (bias is not None and bias.shape != (n_qkv,))
                or 2 * half > head_dim or rope_heads * head_dim > n_qkv):
            raise ValueError(f"inconsistent shapes for attn_in: x {tuple(x.shape)}, w_qkv {tuple(w_qkv.shape)}, "
                             f"qkv {tuple(qkv.shape)}, cos {tuple(cos.shape)}, {rope_heads} x {head_dim} rotated")
        if m and self._attn_in(x.data_ptr(), None if delta is None else delta.data_ptr(), norm_w.data_ptr(), eps,
                               sum_out.data_ptr(), h.data_ptr(), w_qkv.data_ptr(),
                               None if bias is None else bias.data_ptr(), qkv.data_ptr(), cos.data_ptr(),
                               sin.data_ptr(), m, hidden, n_qkv, rope_heads, head_dim, half,
                               torch.get_num_threads()):
            raise ValueError(f"attn_in rejected x {tuple(x.shape)}, w_qkv {tuple(w_qkv.shape)}")

    def mlp_block(self, attn: torch.Tensor, w_o: torch.Tensor, x: torch.Tensor, norm_w: torch.Tensor, eps: float,
                  w_gate_up: torch.Tensor, w_down: torch.Tensor, scratch: "MlpScratch",
                  sum_out: torch.Tensor) -> torch.Tensor:
        """``o_proj`` -> ``add_rms_norm`` -> ``gate_up`` -> SwiGLU -> ``down`` of a plain layer in one call.

        ``attn`` ``[M, H * D]``, ``x`` / ``sum_out`` ``[M, hidden]`` (``sum_out = x + attn @ w_o.T``, may be
        ``x``); returns ``scratch.out`` ``[M, hidden]``, the MLP output of ``rms_norm(sum_out) * norm_w``.
        """
        m, attn_dim = attn.shape
        hidden = x.shape[1]
        inter = w_down.shape[1]
        s = scratch
        _check_all((attn, w_o, x, norm_w, w_gate_up, w_down, sum_out, s.o, s.h, s.gate_up, s.act, s.out))
        if (w_o.shape != (hidden, attn_dim) or x.shape != (m, hidden) or sum_out.shape != x.shape
                or norm_w.shape != (hidden,) or w_gate_up.shape != (2 * inter, hidden)
                or w_down.shape != (hidden, inter) or s.o.shape != x.shape or s.h.shape != x.shape
                or s.out.shape != x.shape or s.gate_up.shape != (m, 2 * inter) or s.act.shape != (m, inter)):
            raise ValueError(f"inconsistent shapes for mlp_block: attn {tuple(attn.shape)}, w_o {tuple(w_o.shape)}, "
                             f"x {tuple(x.shape)}, w_gate_up {tuple(w_gate_up.shape)}, w_down {tuple(w_down.shape)}")
        if m and self._mlp_block(attn.data_ptr(), w_o.data_ptr(), x.data_ptr(), norm_w.data_ptr(), eps,
                                 s.o.data_ptr(), sum_out.data_ptr(), s.h.data_ptr(), w_gate_up.data_ptr(),
                                 s.gate_up.data_ptr(), s.act.data_ptr(), w_down.data_ptr(), s.out.data_ptr(),
                                 m, attn_dim, hidden, inter, torch.get_num_threads()):
            raise ValueError(f"mlp_block rejected attn {tuple(attn.shape)}, x {tuple(x.shape)}")
        return s.out

    def decode_layers(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, inter: int,
                      eps: float) -> "DecodeLayers":
        """A model's one-call decoder layers (``layer.DecodeLayers``: attn_in, cache write + attention, mlp_block)."""
        from backends.cpu.native.layer import DecodeLayers

        return DecodeLayers(self._library, hidden, num_heads, num_kv_heads, head_dim, inter, eps)

    def mlp_scratch(self, rows: int, hidden: int, inter: int) -> "MlpScratch":
        """Buffers for ``mlp_block`` of ``rows`` tokens; a caller reuses them step after step."""
        return MlpScratch(rows, hidden, inter)


class MlpScratch:
    """The intermediate buffers of ``DecodeOps.mlp_block`` for ``rows`` tokens (reused step after step)."""

    FIELDS = ("o", "h", "gate_up", "act", "out")

    def __init__(self, rows: int, hidden: int, inter: int) -> None:
        self.o = torch.empty(rows, hidden)                                              # [M, hidden]
        self.h = torch.empty(rows, hidden)                                              # [M, hidden]
        self.gate_up = torch.empty(rows, 2 * inter)                                     # [M, 2 * inter]
        self.act = torch.empty(rows, inter)                                             # [M, inter]
        self.out = torch.empty(rows, hidden)                                            # [M, hidden]

    def rows(self, rows: int) -> "MlpScratch":
        """The same buffers for the first ``rows`` tokens (views: contiguous, no copy)."""
        if rows > self.o.shape[0]:
            raise ValueError(f"these buffers hold {self.o.shape[0]} rows, not {rows}")
        view = object.__new__(MlpScratch)
        for name in self.FIELDS:
            setattr(view, name, getattr(self, name)[:rows])
        return view


def _check_all(tensors: tuple[torch.Tensor, ...]) -> None:
    """Every tensor float32, on the CPU and contiguous (one pass, for the fused entry points)."""
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_contiguous() or not t.is_cpu:
            raise ValueError(f"fused decode ops need contiguous float32 CPU tensors, got {t.dtype} {tuple(t.shape)}"
                             f" strides {t.stride()} on {t.device}")
