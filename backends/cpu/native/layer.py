"""ctypes binding of ``decode_layer.c``: a plain decoder layer of a decode step in one native call.

``DecodeLayers`` (one per model, built by ``DecodeOps.decode_layers``) keeps
a ``pagedgen_layer`` per layer (weight and cache pointers, shapes, the
layer's attention scale, window and soft-cap) and, per step, one
``pagedgen_step`` (the step's slots, block tables and context lengths, and
scratch buffers reused step after step). ``run`` then costs one ctypes call
per layer. The structures hold raw pointers: each keeps the tensors it points
into alive, and a layer's entry is rebuilt when its cache tensors change
(a new ``allocate_kv_cache``).

With ``record_timings`` set, each call leaves the seconds of its parts in
``last_timings`` (attn_in, attention = cache write + attend, mlp_block): the
benchmark's step breakdown reads them (``bench.step_timers``).
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

_ptr = ctypes.c_void_p
_i64 = ctypes.c_int64
_f64 = ctypes.c_double


class _Layer(ctypes.Structure):
    _fields_ = [(n, _ptr) for n in ("input_norm", "w_qkv", "qkv_bias", "w_o", "post_norm", "w_gate_up", "w_down",
                                    "k_cache", "v_cache")] + \
               [(n, _i64) for n in ("num_blocks", "block_size", "hidden", "num_heads", "num_kv_heads", "head_dim",
                                    "inter", "rope_half", "window")] + \
               [(n, _f64) for n in ("eps", "scale", "softcap")]


class _Step(ctypes.Structure):
    _fields_ = [(n, _i64) for n in ("rows", "max_blocks", "num_threads")] + \
               [(n, _ptr) for n in ("slots", "block_tables", "context_lens", "res", "h", "qkv", "attn", "o",
                                    "gate_up", "act", "out", "timings")]


def _f32(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if t.dtype != torch.float32 or not t.is_contiguous() or not t.is_cpu or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be a contiguous float32 CPU tensor of shape {shape}, got {t.dtype} "
                         f"{tuple(t.shape)} strides {t.stride()} on {t.device}")
    return t


class DecodeLayers:
    """The one-call decoder layers of one model (see the module docstring)."""

    def __init__(self, library: ctypes.CDLL, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 inter: int, eps: float) -> None:
        self._fn = library.pagedgen_decode_layer_f32
        self._fn.argtypes = [ctypes.POINTER(_Layer), ctypes.POINTER(_Step), _ptr, _ptr, _ptr, _ptr]
        self._fn.restype = ctypes.c_int
        self.hidden, self.num_heads, self.num_kv_heads, self.head_dim, self.inter, self.eps = \
            hidden, num_heads, num_kv_heads, head_dim, inter, eps
        self.n_qkv = (num_heads + 2 * num_kv_heads) * head_dim
        self._layers: dict[int, tuple[_Layer, tuple]] = {}        # layer index -> (struct, tensors it points into)
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}    # rows -> scratch
        self.record_timings = False
        self._timings = (_f64 * 3)()
        self.last_timings = (0.0, 0.0, 0.0)

    def layer(self, index: int, w: Any, kv_cache: tuple[torch.Tensor, torch.Tensor], scale: float,
              window: int | None, softcap: float | None) -> _Layer:
        """Layer ``index``'s structure: weights ``w`` (``LayerWeights``), its ``(k_cache, v_cache)``, attention."""
        k_cache, v_cache = kv_cache
        entry = self._layers.get(index)
        if entry is not None and entry[1][-2] is k_cache and entry[1][-1] is v_cache:
            return entry[0]
        hid, d, h_q, h_kv, inter = self.hidden, self.head_dim, self.num_heads, self.num_kv_heads, self.inter
        tensors = (_f32("input_norm", w.input_norm, (hid,)), _f32("qkv", w.qkv, (self.n_qkv, hid)),
                   None if w.qkv_bias is None else _f32("qkv_bias", w.qkv_bias, (self.n_qkv,)),
                   _f32("o_proj", w.o_proj, (hid, h_q * d)), _f32("post_norm", w.post_norm, (hid,)),
                   _f32("gate_up", w.gate_up, (2 * inter, hid)), _f32("down", w.down, (hid, inter)))
        num_blocks, block_size = k_cache.shape[:2]
        caches = (_f32("k_cache", k_cache, (num_blocks, block_size, h_kv, d)),
                  _f32("v_cache", v_cache, (num_blocks, block_size, h_kv, d)))
        s = _Layer(*(None if t is None else t.data_ptr() for t in tensors + caches),
                   num_blocks, block_size, hid, h_q, h_kv, d, inter, 0, window or 0,
                   self.eps, scale, softcap or 0.0)
        self._layers[index] = (s, tensors + caches)
        return s

    def step(self, rows: int, slots: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
             num_threads: int) -> tuple[_Step, dict[str, torch.Tensor], tuple]:
        """The step structure for ``rows`` decode rows: ``slots`` ``[rows]`` int64, ``block_tables``
        ``[rows, max_blocks]`` and ``context_lens`` ``[rows]`` int32; returns it with its scratch buffers
        (``res`` and ``out`` are the layer's outputs) and the tensors it points into."""
        if (slots.dtype != torch.int64 or slots.shape != (rows,) or block_tables.dtype != torch.int32
                or block_tables.dim() != 2 or block_tables.shape[0] != rows or context_lens.dtype != torch.int32
                or context_lens.shape != (rows,)):
            raise ValueError(f"decode layer inputs for {rows} rows: slots [{rows}] int64, block_tables "
                             f"[{rows}, W] and context_lens [{rows}] int32, got {tuple(slots.shape)} {slots.dtype}, "
                             f"{tuple(block_tables.shape)} {block_tables.dtype}, {tuple(context_lens.shape)}")
        slots, block_tables, context_lens = slots.contiguous(), block_tables.contiguous(), context_lens.contiguous()
        bufs = self._buffers.get(rows)
        if bufs is None:
            hid, attn_dim, inter = self.hidden, self.num_heads * self.head_dim, self.inter
            bufs = self._buffers[rows] = {
                "res": torch.empty(rows, hid), "h": torch.empty(rows, hid), "qkv": torch.empty(rows, self.n_qkv),
                "attn": torch.empty(rows, attn_dim), "o": torch.empty(rows, hid),
                "gate_up": torch.empty(rows, 2 * inter), "act": torch.empty(rows, inter),
                "out": torch.empty(rows, hid)}
        b = bufs
        s = _Step(rows, block_tables.shape[1], num_threads, slots.data_ptr(), block_tables.data_ptr(),
                  context_lens.data_ptr(), b["res"].data_ptr(), b["h"].data_ptr(), b["qkv"].data_ptr(),
                  b["attn"].data_ptr(), b["o"].data_ptr(), b["gate_up"].data_ptr(), b["act"].data_ptr(),
                  b["out"].data_ptr(), ctypes.addressof(self._timings) if self.record_timings else None)
        return s, bufs, (slots, block_tables, context_lens)

    def run(self, layer: _Layer, step: _Step, x: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor,
            sin: torch.Tensor) -> None:
        """One layer: ``x`` / ``delta`` ``[rows, hidden]`` contiguous float32 (``delta`` None on the first
        layer), ``cos`` / ``sin`` ``[rows, 1, R/2]``; the step's ``res`` and ``out`` buffers get ``x + delta +
        attention`` and the MLP output."""
        rows = step.rows
        for name, t in (("x", x), ("delta", delta)):
            if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.shape != (rows, self.hidden)):
                raise ValueError(f"{name} must be a contiguous float32 [{rows}, {self.hidden}] tensor")
        half = cos.shape[-1]
        if (cos.dtype != torch.float32 or not cos.is_contiguous() or not sin.is_contiguous()
                or cos.numel() != rows * half or sin.shape != cos.shape or 2 * half > self.head_dim):
            raise ValueError(f"cos and sin must be contiguous float32 [{rows}, 1, R/2], got {tuple(cos.shape)}")
        layer.rope_half = half
        status = self._fn(ctypes.byref(layer), ctypes.byref(step), x.data_ptr(),
                          None if delta is None else delta.data_ptr(), cos.data_ptr(), sin.data_ptr())
        if status == -2:
            raise ValueError("decode layer: a context length, block id or slot is out of range of the cache")
        if status:
            raise ValueError(f"decode layer rejected its shapes (rows {rows}, hidden {self.hidden}, heads "
                             f"{self.num_heads}/{self.num_kv_heads} x {self.head_dim})")
        if self.record_timings:
            self.last_timings = tuple(self._timings)
