"""The decoder of every supported family over a paged KV cache, in torch (cpu backend, tensor parallel).

Runs on a flattened token batch: the new tokens of every scheduled request
laid end to end, no padding between requests (``T`` tokens in all). Attention
is delegated to an ``AttentionBackend``; everything else (embedding, RMSNorm,
RoPE, GQA projections, gated MLP or mixture of experts, LM head) is here.
What differs between families is read from the ``ModelConfig`` (see
``model.config``), never from a class per family. Per layer::

    q, k, v = split(qkv(norm(x)))                 q, k = norm_qk(q, k) (qk_norm); rope(q, k)
    a   = o_proj(attn(q, k, v))                   a = norm(a) (sandwich_norms)
    h   = x + a
    m   = mlp(norm(h))                            down(act(gate) * up), or the experts (MoE)
    out = h + m                                   m = norm(m) (sandwich_norms)

Logits are computed only for the rows in ``logits_indices`` (the last token
of each request that samples), in float32, soft-capped where the family says.
Every projection goes through ``self.linear`` (the device's GEMM helper).

A device may also hand the model ``FusedOps`` (float32): then the residual
add and the next RMSNorm are one call (a layer returns its MLP output
unadded, the next layer's input norm adds it), RoPE rotates the QKV
projection's output in place and SwiGLU is one call, at any number of
tokens: at a few rows torch's per-op dispatch costs more than the
arithmetic, at a prefill chunk its separate passes over memory do. On steps
of at most ``fused_max_rows`` tokens (decode, short chunks; ``ops.max_rows``
unless the device sets more), ops that also offer ``attn_in`` /
``mlp_block`` run a layer in two calls (norm, QKV, RoPE; o_proj through the
MLP) into buffers reused step after step, where the layer is plain enough
(``_plan``); other layers keep the per-op path. On steps of at most
``ops.max_rows`` tokens, ops with ``decode_layers`` run a plain layer in ONE call
(``backends.cpu.native.layer``: the attention's cache write and attend
included) on steps whose attention backend hands over its native decode
inputs (``native_decode_inputs``: a decode-only step it would serve with the
same kernel).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from backends.torch_model.attention import AttentionBackend, KVCache
from backends.torch_model.moe import moe_forward
from backends.torch_model.rope import apply_rope, rotary_cos_sin, rotary_for
from backends.torch_model.weights import LayerWeights, load_weights
from model.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: HF ``LlamaRMSNorm``, or Gemma's where ``weight`` is float32.

    Normalises in float32; a weight in the model dtype scales after the cast
    back (Llama), a float32 weight before it (Gemma's ``(x * (1 + w)).to(dtype)``).
    """
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)                     # [..., n]
    xf = x.float()                                                            # [..., n]
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)             # [..., n]
    if weight.dtype == torch.float32:
        return (xf * weight).to(x.dtype)                                      # [..., n]
    return weight * xf.to(x.dtype)                                            # [..., n]


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(x / cap)`` (HF's soft-capping); ``x`` itself without a cap."""
    if cap is None:
        return x
    return torch.tanh(x / cap) * cap


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}

Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class FusedOps(Protocol):
    """Fused float32 operators (``backends.cpu.native.ops.DecodeOps``); the layer-sized ones (``attn_in``,
    ``mlp_block``, ``decode_layers``: GEMMs inside) for steps of at most ``max_rows`` tokens.

    Inputs are contiguous (``rope_``'s ``qkv``: contiguous rows); each computes
    what its torch expression in the model computes, summation order aside.
    """

    max_rows: int

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, rms_norm(s, weight, eps))`` with ``s = x + delta`` (``x`` without ``delta``)."""

    def rope_(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
              head_dim: int) -> torch.Tensor:
        """``apply_rope`` in place on the first ``num_heads`` heads of each ``[T, ...]`` row."""

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``F.silu(gate) * up`` of ``gate_up`` ``[T, 2 * inter]`` -> ``[T, inter]``."""

    def attn_in(self, x: torch.Tensor, delta: torch.Tensor | None, norm_w: torch.Tensor, eps: float,
                w_qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                rope_heads: int, head_dim: int, sum_out: torch.Tensor, h: torch.Tensor, qkv: torch.Tensor) -> None:
        """``sum_out, h = add_rms_norm(x, delta)``, ``qkv = rope_(linear(h, w_qkv, bias))`` into the buffers."""

    def mlp_block(self, attn: torch.Tensor, w_o: torch.Tensor, x: torch.Tensor, norm_w: torch.Tensor, eps: float,
                  w_gate_up: torch.Tensor, w_down: torch.Tensor, scratch: Any, sum_out: torch.Tensor) -> torch.Tensor:
        """``sum_out = x + o_proj(attn)``; returns ``down(silu_mul(gate_up(rms_norm(sum_out))))`` (in ``scratch``)."""

    def mlp_scratch(self, rows: int, hidden: int, inter: int) -> Any:
        """The reusable intermediate buffers of ``mlp_block`` for ``rows`` tokens."""


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _plain(*tensors: torch.Tensor | None) -> bool:
    """All given weights contiguous float32 CPU tensors (not quantized), as the fused entry points take them."""
    return all(t is None or (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.is_cpu
                             and t.is_contiguous()) for t in tensors)


class LlamaModel:
    """Decoder weights plus the forward pass for every family; holds no per-step state.

    ``attention`` is the device's paged attention; ``dtype`` is the compute
    and KV cache dtype (``torch.float32`` or ``torch.bfloat16``). ``linear``
    has the signature of ``F.linear`` (``x [T, in]``, ``w [out, in]``,
    optional bias) and may return a non-contiguous ``[T, out]`` view; devices
    pass their fastest GEMM orientation (and a quantized one may slot in).
    ``ops`` (float32 only): the elementwise ones on every step, the layer-sized ones on steps of at most
    ``fused_max_rows`` tokens (``ops.max_rows``; a device whose ops' GEMMs run more rows sets it higher).
    """

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, np.ndarray],
        attention: AttentionBackend,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        linear: Linear = F.linear,
        ops: FusedOps | None = None,
    ) -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.config = config
        self.attention = attention
        self.linear = linear
        self.ops = ops if dtype == torch.float32 else None
        self.dtype = dtype
        self.device = torch.device(device)
        self.weights = load_weights(config, weights, dtype)
        if self.device.type != "cpu":
            self._move_weights()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.act = ACTIVATIONS[config.hidden_act]
        self.is_silu = config.hidden_act == "silu"
        # One rotary per distinct (base, scaling) of the layers; rope_index[i] picks layer i's.
        ropes = [repr(config.layer_rope(i)) for i in range(config.num_hidden_layers)]
        distinct = list(dict.fromkeys(ropes))
        self.rotaries = [rotary_for(config, ropes.index(key)).to(self.device) for key in distinct]
        self.rope_index = [distinct.index(key) for key in ropes]
        self.needs_context_lens = any(r.long_inv_freq is not None for r in self.rotaries)
        self.layer_attention = [config.layer_attention(i) for i in range(config.num_hidden_layers)]
        self.embed_scale = None if config.embedding_scale is None else \
            torch.tensor(config.embedding_scale, dtype=torch.float32).to(dtype)       # HF: the scale in the weight dtype
        # Tensor parallelism (backends/tp) sets these on a shard's model: a sum over
        # the ranks of the row-parallel o_proj / down outputs, and a vocab-parallel lookup.
        self.all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.embedding: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.embedding
        # Fused decode layers (ops with attn_in / mlp_block): per layer whether each half applies,
        # decided on the first fused step; the buffers they write, per step shape, reused step after step.
        self._fused_plan: list[tuple[bool, bool]] | None = None
        self.fused_max_rows = 0 if self.ops is None else self.ops.max_rows
        self._scratch: dict[tuple[int, int, int], dict[str, Any]] = {}      # (rows, n_qkv, inter) -> views
        self._scratch_base: dict[tuple[int, int], dict[str, Any]] = {}      # (n_qkv, inter) -> the buffers
        # One-call layers (ops.decode_layers), for the layers whose MLP width is the model's (None: not offered);
        # they belong to these ops: a caller that swaps ``ops`` later gets the ops' own (two-call) path.
        self.decode_layers = None
        self._decode_layers_ops = self.ops
        if self.ops is not None and hasattr(self.ops, "decode_layers") and self.device.type == "cpu" \
                and self.weights.layers and self.weights.layers[0].down is not None:
            self.decode_layers = self.ops.decode_layers(config.hidden_size, self.num_heads, self.num_kv_heads,
                                                        self.head_dim, self.weights.layers[0].down.shape[1],
                                                        config.rms_norm_eps)

    def _move_weights(self) -> None:
        w = self.weights
        for layer in w.layers:
            for name, t in vars(layer).items():
                if t is not None:
                    setattr(layer, name, t.to(self.device))
        tied = w.lm_head is w.embed
        w.embed = w.embed.to(self.device)
        w.final_norm = w.final_norm.to(self.device)
        w.lm_head = w.embed if tied else w.lm_head.to(self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[KVCache],
        attn_metadata: Any,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """Run the step; return float32 logits ``[N, vocab]`` of ``logits_indices``.

        ``input_ids`` and ``positions`` are ``[T]`` int64, ``logits_indices``
        is ``[N]`` int64 (rows of the flattened batch), ``kv_caches`` has one
        ``(k_cache, v_cache)`` per layer. Call under ``torch.inference_mode()``.
        """
        if len(kv_caches) != len(self.weights.layers):
            raise ValueError(f"need one KV cache per layer ({len(self.weights.layers)}), got {len(kv_caches)}")
        context_lens = self.attention.token_context_lens(attn_metadata) if self.needs_context_lens else None
        rope = [rotary_cos_sin(r, positions, self.dtype, context_lens) for r in self.rotaries]  # [T, 1, R/2] each
        x = self.embedding(input_ids, self.weights.embed)                      # [T, hidden]
        if self.embed_scale is not None:
            x = x * self.embed_scale                                           # [T, hidden]
        ops = self.ops
        delta = None                                                           # fused: the last MLP output, unadded
        rows = input_ids.shape[0]
        plan = self._plan() if ops is not None and hasattr(ops, "attn_in") and rows <= self.fused_max_rows \
            else None
        one_call = self._one_call_step(attn_metadata, rows) if plan is not None and rows <= ops.max_rows else None
        for i, layer in enumerate(self.weights.layers):
            cos, sin = rope[self.rope_index[i]]
            if one_call is not None and plan[i][0] and plan[i][1] and layer.down.shape[1] == self.decode_layers.inter:
                la, layers = self.layer_attention[i], self.decode_layers
                layers.run(layers.layer(i, layer, kv_caches[i], la.scale, la.window, la.softcap), one_call[0],
                           _dense(x), None if delta is None else _dense(delta), cos, sin)
                x, delta = one_call[1]["res"], one_call[1]["out"]                  # [T, hidden] each
                continue
            if plan is not None and plan[i][0]:
                x, delta = self._fused_layer(i, layer, x, delta, cos, sin, kv_caches[i], attn_metadata,
                                             plan[i][1])                       # [T, hidden] each
                continue
            x, delta = self._layer(i, layer, x, delta, cos, sin, kv_caches[i], attn_metadata, ops)  # [T, hidden]
        if ops is not None:
            x, delta = ops.add_rms_norm(_dense(x), None if delta is None else _dense(delta),
                                        self.weights.final_norm, self.config.rms_norm_eps)  # [T, hidden] each
            x = delta.index_select(0, logits_indices)                          # [N, hidden]
        else:
            x = x.index_select(0, logits_indices)                               # [N, hidden]
            x = rms_norm(x, self.weights.final_norm, self.config.rms_norm_eps)  # [N, hidden]
        logits = self.linear(x, self.weights.lm_head, None)                     # [N, vocab]
        return softcap(logits, self.config.final_logit_softcap).float().contiguous()  # [N, vocab]

    def _plan(self) -> list[tuple[bool, bool]]:
        """Per layer: (attention input fusable: no qk norm; rest fusable: plain SwiGLU layer, one rank)."""
        if self._fused_plan is None or self.all_reduce is not None:
            self._fused_plan = [
                (w.q_norm is None and self.device.type == "cpu" and _plain(w.input_norm, w.qkv, w.qkv_bias),
                 w.router is None and w.attn_out_norm is None and w.mlp_out_norm is None and self.is_silu
                 and self.all_reduce is None and w.gate_up is not None and w.down is not None
                 and _plain(w.o_proj, w.post_norm, w.gate_up, w.down))
                for w in self.weights.layers]
        return self._fused_plan

    def _one_call_step(self, attn_metadata: Any, rows: int) -> tuple[Any, dict[str, torch.Tensor], tuple] | None:
        """The step of the one-call layers (``decode_layers.step``), or None where they do not apply."""
        inputs = getattr(self.attention, "native_decode_inputs", None)
        if self.decode_layers is None or self.ops is not self._decode_layers_ops or self.all_reduce is not None \
                or inputs is None:
            return None
        native = inputs(attn_metadata)
        return None if native is None else self.decode_layers.step(rows, *native, torch.get_num_threads())

    def _buffers(self, rows: int, hidden: int, n_qkv: int, inter: int) -> dict[str, Any]:
        """The fused layer's buffers for ``rows`` tokens: views of one set per layer shape, grown to the most
        rows a step has had (so a server's many batch sizes share one allocation)."""
        key = (rows, n_qkv, inter)
        bufs = self._scratch.get(key)
        if bufs is None:
            base = self._scratch_base.get((n_qkv, inter))
            if base is None or base["res"].shape[0] < rows:
                base = self._scratch_base[(n_qkv, inter)] = {
                    "res": torch.empty(rows, hidden), "h": torch.empty(rows, hidden),
                    "qkv": torch.empty(rows, n_qkv),
                    "mlp": self.ops.mlp_scratch(rows, hidden, inter) if inter else None}
                self._scratch = {k: v for k, v in self._scratch.items() if k[1:] != (n_qkv, inter)}
            bufs = self._scratch[key] = {
                "res": base["res"][:rows], "h": base["h"][:rows], "qkv": base["qkv"][:rows],
                "mlp": None if base["mlp"] is None else base["mlp"].rows(rows)}
        return bufs

    def _fused_layer(self, layer_idx: int, w: LayerWeights, x: torch.Tensor, delta: torch.Tensor | None,
                     cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache, attn_metadata: Any,
                     mlp_fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``_layer`` with ``ops`` in two native calls (attention input; o_proj through the MLP where
        ``mlp_fused``), writing reused buffers: returns ``(x + a, m)`` like the fused ``_layer``."""
        ops = self.ops
        num_tokens, hidden = x.shape
        h_q, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        eps = self.config.rms_norm_eps
        n_qkv = w.qkv.shape[0]
        bufs = self._buffers(num_tokens, hidden, n_qkv, w.down.shape[1] if mlp_fused else 0)
        x = _dense(x)
        res = bufs["res"]
        ops.attn_in(x, None if delta is None else _dense(delta), w.input_norm, eps, w.qkv, w.qkv_bias, cos, sin,
                    h_q + h_kv, d, res if delta is not None else x, bufs["h"], bufs["qkv"])
        x = res if delta is not None else x                                    # [T, hidden]: x + delta
        qkv = bufs["qkv"]                                                      # [T, (H + 2*Hkv) * D]
        qk = qkv[:, : (h_q + h_kv) * d].view(num_tokens, h_q + h_kv, d)        # [T, H + Hkv, D]
        v = qkv[:, (h_q + h_kv) * d:].view(num_tokens, h_kv, d)                # [T, Hkv, D]
        attn = self.attention.forward(layer_idx, qk[:, :h_q], qk[:, h_q:], v, kv_cache, attn_metadata,
                                      self.layer_attention[layer_idx])         # [T, H, D]
        attn = _dense(attn.reshape(num_tokens, h_q * d))                       # [T, H * D]
        if mlp_fused:
            m = ops.mlp_block(attn, w.o_proj, x, w.post_norm, eps, w.gate_up, w.down, bufs["mlp"], res)
            return res, m                                                      # [T, hidden] each
        o = self._reduce(self.linear(attn, w.o_proj, None))                    # [T, hidden]
        if w.attn_out_norm is not None:
            o = rms_norm(o, w.attn_out_norm, eps)                              # [T, hidden]
        x, h = ops.add_rms_norm(x, _dense(o), w.post_norm, eps)                # [T, hidden] each
        m = moe_forward(h, w, self.config, self.linear, self.act) if w.router is not None \
            else self._mlp(h, w.gate_up, w.down, ops)                          # [T, hidden]
        m = self._reduce(m)
        if w.mlp_out_norm is not None:
            m = rms_norm(m, w.mlp_out_norm, eps)                               # [T, hidden]
        return x, m

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.all_reduce is None else self.all_reduce(x)

    def _layer(
        self,
        layer_idx: int,
        w: LayerWeights,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        attn_metadata: Any,
        ops: FusedOps | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decoder layer over ``x`` (plus the previous layer's unadded ``delta``, fused path only).

        Returns ``(x + m, None)``, or with ``ops`` ``(x, m)``: the MLP output
        ``m`` is added by the next layer's (or the final) norm.
        """
        num_tokens = x.shape[0]
        h_q, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        eps = self.config.rms_norm_eps

        linear = self.linear
        if ops is not None:
            x, h = ops.add_rms_norm(_dense(x), None if delta is None else _dense(delta), w.input_norm, eps)
        else:
            h = rms_norm(x, w.input_norm, eps)                                 # [T, hidden]
        qkv = linear(h, w.qkv, w.qkv_bias)                                     # [T, (H + 2*Hkv) * D]
        if ops is not None and w.q_norm is None and qkv.stride(-1) == 1:
            ops.rope_(qkv, cos, sin, h_q + h_kv, d)                            # q and k rotated in place
            qk = qkv[:, : (h_q + h_kv) * d].view(num_tokens, h_q + h_kv, d)    # [T, H + Hkv, D]
        else:
            qk = qkv[:, : (h_q + h_kv) * d].reshape(num_tokens, h_q + h_kv, d)  # [T, H + Hkv, D]
            if w.q_norm is not None:
                qk = torch.cat((rms_norm(qk[:, :h_q], w.q_norm, eps), rms_norm(qk[:, h_q:], w.k_norm, eps)), dim=1)
            qk = apply_rope(qk, cos, sin)                                      # [T, H + Hkv, D]
        q = qk[:, :h_q]                                                        # [T, H, D]
        k = qk[:, h_q:]                                                        # [T, Hkv, D]
        v = qkv[:, (h_q + h_kv) * d:].reshape(num_tokens, h_kv, d)              # [T, Hkv, D]
        attn = self.attention.forward(layer_idx, q, k, v, kv_cache, attn_metadata,
                                      self.layer_attention[layer_idx])         # [T, H, D]
        o = self._reduce(linear(attn.reshape(num_tokens, h_q * d), w.o_proj, None))  # [T, hidden]
        if w.attn_out_norm is not None:
            o = rms_norm(o, w.attn_out_norm, eps)                              # [T, hidden]
        if ops is not None:
            x, h = ops.add_rms_norm(x, _dense(o), w.post_norm, eps)            # [T, hidden] each
        else:
            x = x + o                                                          # [T, hidden]
            h = rms_norm(x, w.post_norm, eps)                                  # [T, hidden]
        if w.router is not None:
            m = moe_forward(h, w, self.config, linear, self.act)               # [T, hidden]
        else:
            m = self._mlp(h, w.gate_up, w.down, ops)                           # [T, hidden]
        m = self._reduce(m)
        if w.mlp_out_norm is not None:
            m = rms_norm(m, w.mlp_out_norm, eps)                               # [T, hidden]
        if ops is not None:
            return x, m                                                        # [T, hidden] each
        return x + m, None                                                     # [T, hidden]

    def _mlp(self, h: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
             ops: FusedOps | None = None) -> torch.Tensor:
        gu = self.linear(h, gate_up, None)                                     # [T, 2 * inter]
        if ops is not None and self.is_silu and gu.is_contiguous():
            act = ops.silu_mul(gu)                                             # [T, inter]
        else:
            gate, up = gu.chunk(2, dim=-1)                                     # [T, inter] each
            act = self.act(gate) * up                                          # [T, inter]
        return self.linear(act, down, None)                                    # [T, hidden]
