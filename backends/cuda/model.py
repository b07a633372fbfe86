"""The shared decoder laid out for the GPU: static step buffers, fused ops, pieces.

Same weights (``backends.torch_model.load_weights``), rotary frequencies and
math as ``backends.torch_model.LlamaModel``, for every family the
``ModelConfig`` describes; the differences are only in how the step runs, so
CUDA graphs can capture it:

- every tensor that crosses a piece boundary lives in ``StepBuffers``,
  allocated once for the largest step (``max_num_batched_tokens``) and used
  through ``sized(T)`` views; GEMMs write into them with ``out=``;
- the residual stream is carried separately and added inside the fused
  RMSNorm kernel; rotary embedding rotates q and k inside the qkv buffer (the
  Triton kernel for plain kinds, per layer's inverse frequencies and rotary
  dims; LongRoPE from cos/sin the step computes before the pieces, because
  they depend on each request's context length);
- the forward is cut at attention into ``num_layers + 1`` pieces::

      piece 0:   embed (* scale) -> norm -> qkv -> (q/k norm) -> rope          (writes qkv)
      attend 0:  reshape_and_cache + paged_attention (the layer's window, scale, soft-cap)
      piece i:   o_proj (-> norm) -> add+norm -> MLP or experts (-> norm) -> add+norm -> qkv -> rope of layer i
      ...
      piece L:   o_proj (-> norm) -> add+norm -> MLP of the last layer        (writes hidden)
      logits:    rows that sample -> add+norm -> lm_head (-> soft-cap)       (float32)

  ``piecewise`` graphs capture the pieces and run attention eagerly;
  ``full`` graphs capture all of it for decode batches. The experts run as
  grouped Triton GEMMs with no host sync (``backends.cuda.kernels.moe``), so
  MoE steps are capturable too.

Projections loaded packed (``QuantWeight``: the backend keeps 4- and 8-bit
checkpoints quantized) run through the W4A16/W8A16 Triton GEMM
(``backends.cuda.kernels.quant_matmul``) at decode and prefill alike, into
the same buffers and with no host sync; a packed embedding is looked up by
gathering the step's rows of codes, scales and biases and dequantizing them
to the model dtype. ``warm_up_kernels`` compiles every GEMM tile variant and
both MoE block heights, so no request waits for a compile.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from backends.cuda.kernels.moe import block_m_for, fused_moe, grouped_gemm
from backends.cuda.kernels.quant_matmul import CONFIGS, choose_config, dequantize_weight, quant_matmul
from backends.cuda.kernels.rms_norm import rms_norm
from backends.cuda.kernels.rotary import rotary_embedding
from backends.torch_model.model import ACTIVATIONS, rms_norm as torch_rms_norm, softcap
from backends.torch_model.rope import rotary_cos_sin, rotary_for
from backends.torch_model.weights import LayerWeights, ModelWeights, QuantWeight
from model.config import ModelConfig


@dataclass
class StepBuffers:
    """Tensors that cross piece boundaries, sized for the largest step."""

    input_ids: torch.Tensor       # [T] int64
    positions: torch.Tensor       # [T] int64
    residual: torch.Tensor        # [T, hidden]: the residual stream
    hidden: torch.Tensor          # [T, hidden]: the last MLP output (added to residual by the next norm)
    qkv: torch.Tensor             # [T, (H + 2*Hkv) * D]
    attn: torch.Tensor            # [T, H * D]: attention output
    rope_cos: torch.Tensor        # [T, R/2] LongRoPE's cos of the step ([T, 0] without LongRoPE)
    rope_sin: torch.Tensor        # [T, R/2] its sin

    @classmethod
    def allocate(cls, config: ModelConfig, max_tokens: int, dtype: torch.dtype,
                 device: torch.device | str) -> "StepBuffers":
        h, h_kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        longrope = rotary_for(config).long_inv_freq is not None
        half = config.rotary_dim // 2 if longrope else 0
        return cls(
            input_ids=torch.zeros(max_tokens, dtype=torch.int64, device=device),
            positions=torch.zeros(max_tokens, dtype=torch.int64, device=device),
            residual=torch.zeros(max_tokens, config.hidden_size, dtype=dtype, device=device),
            hidden=torch.zeros(max_tokens, config.hidden_size, dtype=dtype, device=device),
            qkv=torch.zeros(max_tokens, (h + 2 * h_kv) * d, dtype=dtype, device=device),
            attn=torch.zeros(max_tokens, h * d, dtype=dtype, device=device),
            rope_cos=torch.zeros(max_tokens, half, dtype=dtype, device=device),
            rope_sin=torch.zeros(max_tokens, half, dtype=dtype, device=device),
        )

    @property
    def max_tokens(self) -> int:
        return self.input_ids.shape[0]

    def sized(self, num_tokens: int) -> "StepBuffers":
        """Views of the first ``num_tokens`` rows of every buffer."""
        if num_tokens > self.max_tokens:
            raise ValueError(f"step of {num_tokens} tokens exceeds the buffers ({self.max_tokens})")
        return StepBuffers(**{f.name: getattr(self, f.name)[:num_tokens] for f in fields(self)})


def _mm(x: torch.Tensor, w: torch.Tensor | QuantWeight, bias: torch.Tensor | None = None,
        out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` (``w`` is ``[out, in]``), optionally into ``out``: every projection's one GEMM helper.

    A packed ``w`` runs the quantized GEMM (its bias added in place after it).
    """
    if isinstance(w, QuantWeight):
        out = quant_matmul(x.contiguous(), w.codes, w.scales, w.biases, w.bits, w.group_size, out=out)
        return out if bias is None else out.add_(bias)
    if out is None:
        return F.linear(x, w, bias)
    if bias is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(bias, x, w.t(), out=out)


class CUDAModel:
    """The decoder over ``StepBuffers`` (see the module docstring)."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, attention: Any) -> None:
        self.config = config
        self.weights = weights
        self.attention = attention
        self.dtype = weights.embed.dtype
        self.device = weights.embed.device
        self.num_layers = len(weights.layers)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.eps = config.rms_norm_eps
        self.act = ACTIVATIONS[config.hidden_act]
        self.rotaries = [rotary_for(config, i).to(self.device) for i in range(self.num_layers)]
        self.longrope = self.rotaries[0].long_inv_freq is not None
        if len({repr(config.layer_rope(i)) for i in range(self.num_layers)}) > 1 and any(
                r.long_inv_freq is not None for r in self.rotaries):
            raise ValueError("the cuda backend runs LongRoPE only when every layer shares it")
        self.layer_attention = [config.layer_attention(i) for i in range(self.num_layers)]
        # HF multiplies by the scale rounded to the weight dtype (sqrt(3072) is 55.5 in bfloat16)
        self.embed_scale = None if config.embedding_scale is None else \
            float(torch.tensor(config.embedding_scale, dtype=torch.float32).to(self.dtype))

    @property
    def num_pieces(self) -> int:
        return self.num_layers + 1

    # -- pieces (capturable: fixed shapes, outputs in the buffers) --------------

    def run_piece(self, index: int, buf: StepBuffers) -> None:
        """Piece ``index`` of the forward (0 .. num_layers) on ``buf``."""
        if index > 0:
            self._post_attention(index - 1, buf)
        if index < self.num_layers:
            self._pre_attention(index, buf)

    def _pre_attention(self, i: int, buf: StepBuffers) -> None:
        w = self.weights.layers[i]
        if i == 0:
            self._embed(buf)                                                            # [T, hidden]
            if self.embed_scale is not None:
                buf.residual.mul_(self.embed_scale)
            h = rms_norm(buf.residual, w.input_norm, self.eps)                          # [T, hidden]
        else:
            h = rms_norm(buf.hidden, w.input_norm, self.eps, residual=buf.residual)     # [T, hidden]
        _mm(h, w.qkv, w.qkv_bias, out=buf.qkv)                                          # [T, (H + 2*Hkv) * D]
        heads = self.num_heads + self.num_kv_heads
        qk = buf.qkv[:, : heads * self.head_dim].view(-1, heads, self.head_dim)         # [T, H + Hkv, D]
        if w.q_norm is not None:
            qk[:, : self.num_heads] = torch_rms_norm(qk[:, : self.num_heads], w.q_norm, self.eps)
            qk[:, self.num_heads:] = torch_rms_norm(qk[:, self.num_heads:], w.k_norm, self.eps)
        rotary = self.rotaries[i]
        rot = qk[:, :, : rotary.rotary_dim]                                             # [T, H + Hkv, R]
        if not self.longrope:
            rotary_embedding(rot, buf.positions, rotary.inv_freq)
            return
        half = rotary.rotary_dim // 2
        cos, sin = buf.rope_cos[:, None, :], buf.rope_sin[:, None, :]                   # [T, 1, R/2] each
        x1, x2 = rot[..., :half].clone(), rot[..., half:]                               # [T, H + Hkv, R/2] each
        rot[..., :half] = x1 * cos - x2 * sin
        rot[..., half:] = x2 * cos + x1 * sin

    def _embed(self, buf: StepBuffers) -> None:
        """The step's token embeddings into ``buf.residual`` (a packed table: gathered rows, dequantized)."""
        embed = self.weights.embed
        if not isinstance(embed, QuantWeight):
            torch.index_select(embed, 0, buf.input_ids, out=buf.residual)                 # [T, hidden]
            return
        rows = [t.index_select(0, buf.input_ids) for t in (embed.codes, embed.scales, embed.biases)]
        buf.residual.copy_(dequantize_weight(*rows, embed.bits, embed.group_size, self.dtype))  # [T, hidden]

    def _post_attention(self, i: int, buf: StepBuffers) -> None:
        w = self.weights.layers[i]
        o = _mm(buf.attn, w.o_proj)                                                     # [T, hidden]
        if w.attn_out_norm is not None:
            o = rms_norm(o, w.attn_out_norm, self.eps)                                  # [T, hidden]
        h = rms_norm(o, w.post_norm, self.eps, residual=buf.residual)                   # [T, hidden]
        if w.router is not None:
            m = self._experts(h, w)                                                     # [T, hidden]
        else:
            gate, up = _mm(h, w.gate_up).chunk(2, dim=-1)                               # [T, inter] each
            if w.mlp_out_norm is None:
                _mm(self.act(gate) * up, w.down, out=buf.hidden)                        # [T, hidden]
                return
            m = _mm(self.act(gate) * up, w.down)                                        # [T, hidden]
        if w.mlp_out_norm is not None:
            rms_norm(m, w.mlp_out_norm, self.eps, out=buf.hidden)                       # [T, hidden]
        else:
            buf.hidden.copy_(m)

    def _experts(self, h: torch.Tensor, w: LayerWeights) -> torch.Tensor:
        """The MoE MLP of one layer: routing in torch, experts as grouped Triton GEMMs."""
        out = fused_moe(h, w.router, w.experts_gate_up, w.experts_down, self.config, self.act)  # [T, hidden]
        if w.shared_gate_up is not None:
            gate, up = _mm(h, w.shared_gate_up).chunk(2, dim=-1)                        # [T, S] each
            shared = _mm(self.act(gate) * up, w.shared_down)                            # [T, hidden]
            out = out + torch.sigmoid(_mm(h, w.shared_gate)) * shared                   # [T, hidden]
        return out

    def warm_up_kernels(self, max_tokens: int) -> None:
        """Compile every quantized-GEMM tile variant and MoE block height a step of up to ``max_tokens`` uses.

        The GEMM's variants depend on the weight's layout (bits, group, scale
        dtype, alignment of its sizes) and the tile config, which the step's
        token count picks (``quant_matmul.choose_config``; the token count
        itself is not specialised on): one launch per distinct weight shape
        and layout and per reachable config. MoE's grouped GEMM
        compiles once per block height (``moe.block_m_for``); it is launched
        with every block marked unused, so it compiles and computes nothing.
        """
        packed = {}                                           # (bits, group, scale dtype, N, K) -> a weight
        for w in [self.weights.lm_head, *(t for layer in self.weights.layers for t in vars(layer).values())]:
            if isinstance(w, QuantWeight):
                packed.setdefault((w.bits, w.group_size, w.scales.dtype, *w.shape), w)
        first_of_config = {}                                  # config -> the smallest token count using it
        for n in range(1, max_tokens + 1):
            first_of_config.setdefault(choose_config(n), n)
            if len(first_of_config) == len(CONFIGS):
                break
        for w in packed.values():
            for n in first_of_config.values():
                x = torch.zeros((n, w.shape[1]), dtype=self.dtype, device=self.device)      # [n, K]
                quant_matmul(x, w.codes, w.scales, w.biases, w.bits, w.group_size)
        for layer in self.weights.layers:
            if layer.experts_gate_up is None:
                continue
            num_experts = layer.experts_gate_up.shape[0]
            for block_m in sorted({block_m_for(1), block_m_for(1 << 20)}):
                for w in (layer.experts_gate_up, layer.experts_down):
                    a = torch.zeros((1, w.shape[2]), dtype=self.dtype, device=self.device)
                    rows = torch.full((block_m,), -1, dtype=torch.int32, device=self.device)
                    unused = torch.full((1,), num_experts, dtype=torch.int32, device=self.device)
                    grouped_gemm(a, w, rows, unused, block_m)
            break                                             # every MoE layer has the same shapes

    # -- attention, rope and logits (eager in piecewise mode) -------------------

    def prepare_rope(self, buf: StepBuffers, metadata: Any) -> None:
        """LongRoPE's cos/sin of the step into ``buf`` (each token's factor set by its request's context)."""
        if not self.longrope:
            return
        num_tokens = buf.positions.shape[0]
        rows = torch.arange(num_tokens, device=self.device, dtype=metadata.query_start_locs.dtype)
        request = torch.searchsorted(metadata.query_start_locs[1:], rows, right=True)     # [T]
        request = request.clamp_max(metadata.context_lens.shape[0] - 1)                  # padding rows
        context_lens = metadata.context_lens.long()[request]                              # [T]
        cos, sin = rotary_cos_sin(self.rotaries[0], buf.positions, self.dtype, context_lens)  # [T, 1, R/2] each
        buf.rope_cos.copy_(cos[:, 0])
        buf.rope_sin.copy_(sin[:, 0])

    def attend(self, i: int, buf: StepBuffers, kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
               metadata: Any) -> None:
        """Layer ``i``'s cache write and attention, from ``buf.qkv`` into ``buf.attn``."""
        h, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        num_tokens = buf.qkv.shape[0]
        qkv = buf.qkv.view(num_tokens, h + 2 * h_kv, d)
        self.attention.forward(i, qkv[:, :h], qkv[:, h: h + h_kv], qkv[:, h + h_kv:], kv_caches[i], metadata,
                               out=buf.attn.view(num_tokens, h, d), layer=self.layer_attention[i])

    def compute_logits(self, buf: StepBuffers, logits_indices: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[N, vocab]`` of the rows ``logits_indices`` after the last piece."""
        hidden = buf.hidden.index_select(0, logits_indices)                             # [N, hidden]
        residual = buf.residual.index_select(0, logits_indices)                         # [N, hidden]
        h = rms_norm(hidden, self.weights.final_norm, self.eps, residual=residual)      # [N, hidden]
        return softcap(_mm(h, self.weights.lm_head), self.config.final_logit_softcap).float()  # [N, vocab]

    def forward(self, buf: StepBuffers, kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]], metadata: Any,
                logits_indices: torch.Tensor,
                piece_runner: Callable[[int, StepBuffers], None] | None = None) -> torch.Tensor:
        """The whole step on ``buf`` (inputs already in ``buf.input_ids`` / ``buf.positions``).

        ``piece_runner(index, buf)`` runs a piece (a graph replay in
        piecewise mode); default: ``run_piece``.
        """
        run = piece_runner or self.run_piece
        self.prepare_rope(buf, metadata)
        for i in range(self.num_layers):
            run(i, buf)
            self.attend(i, buf, kv_caches, metadata)
        run(self.num_layers, buf)
        return self.compute_logits(buf, logits_indices)
