"""The shared Llama model laid out for the GPU: static step buffers, fused ops, pieces.

Same weights (``backends.torch_model.load_weights``), rotary frequencies and
math as ``backends.torch_model.LlamaModel``; the differences are only in how
the step runs, so CUDA graphs can capture it:

- every tensor that crosses a piece boundary lives in ``StepBuffers``,
  allocated once for the largest step (``max_num_batched_tokens``) and used
  through ``sized(T)`` views; GEMMs write into them with ``out=``;
- the residual stream is carried separately and added inside the fused
  RMSNorm kernel; rotary embedding rotates q and k inside the qkv buffer;
- the forward is cut at attention into ``num_layers + 1`` pieces::

      piece 0:   embed -> norm -> qkv -> rope                   (writes qkv)
      attend 0:  reshape_and_cache + paged_attention            (writes attn)
      piece i:   o_proj -> add+norm -> MLP -> add+norm -> qkv -> rope of layer i
      ...
      piece L:   o_proj -> add+norm -> MLP of the last layer    (writes hidden)
      logits:    rows that sample -> add+norm -> lm_head        (float32)

  ``piecewise`` graphs capture the pieces and run attention eagerly;
  ``full`` graphs capture all of it for decode batches.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from backends.cuda.kernels.rms_norm import rms_norm
from backends.cuda.kernels.rotary import rotary_embedding
from backends.torch_model.rope import compute_inv_freq
from backends.torch_model.weights import ModelWeights
from engine.model_config import ModelConfig


@dataclass
class StepBuffers:
    """Tensors that cross piece boundaries, sized for the largest step."""

    input_ids: torch.Tensor       # [T] int64
    positions: torch.Tensor       # [T] int64
    residual: torch.Tensor        # [T, hidden]: the residual stream
    hidden: torch.Tensor          # [T, hidden]: the last MLP output (added to residual by the next norm)
    qkv: torch.Tensor             # [T, (H + 2*Hkv) * D]
    attn: torch.Tensor            # [T, H * D]: attention output

    @classmethod
    def allocate(cls, config: ModelConfig, max_tokens: int, dtype: torch.dtype,
                 device: torch.device | str) -> "StepBuffers":
        h, h_kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        return cls(
            input_ids=torch.zeros(max_tokens, dtype=torch.int64, device=device),
            positions=torch.zeros(max_tokens, dtype=torch.int64, device=device),
            residual=torch.zeros(max_tokens, config.hidden_size, dtype=dtype, device=device),
            hidden=torch.zeros(max_tokens, config.hidden_size, dtype=dtype, device=device),
            qkv=torch.zeros(max_tokens, (h + 2 * h_kv) * d, dtype=dtype, device=device),
            attn=torch.zeros(max_tokens, h * d, dtype=dtype, device=device),
        )

    @property
    def max_tokens(self) -> int:
        return self.input_ids.shape[0]

    def sized(self, num_tokens: int) -> "StepBuffers":
        """Views of the first ``num_tokens`` rows of every buffer."""
        if num_tokens > self.max_tokens:
            raise ValueError(f"step of {num_tokens} tokens exceeds the buffers ({self.max_tokens})")
        return StepBuffers(**{f.name: getattr(self, f.name)[:num_tokens] for f in fields(self)})


def _mm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
        out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` (``w`` is ``[out, in]``), optionally into ``out``."""
    if out is None:
        return F.linear(x, w, bias)
    if bias is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(bias, x, w.t(), out=out)


class CUDAModel:
    """A Llama-family decoder over ``StepBuffers`` (see the module docstring)."""

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
        self.inv_freq = compute_inv_freq(config).to(self.device)                    # [D/2] float32

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
            torch.index_select(self.weights.embed, 0, buf.input_ids, out=buf.residual)   # [T, hidden]
            h = rms_norm(buf.residual, w.input_norm, self.eps)                          # [T, hidden]
        else:
            h = rms_norm(buf.hidden, w.input_norm, self.eps, residual=buf.residual)     # [T, hidden]
        _mm(h, w.qkv, w.qkv_bias, out=buf.qkv)                                          # [T, (H + 2*Hkv) * D]
        qk = buf.qkv[:, : (self.num_heads + self.num_kv_heads) * self.head_dim]
        rotary_embedding(qk.view(-1, self.num_heads + self.num_kv_heads, self.head_dim),
                         buf.positions, self.inv_freq)

    def _post_attention(self, i: int, buf: StepBuffers) -> None:
        w = self.weights.layers[i]
        o = _mm(buf.attn, w.o_proj)                                                     # [T, hidden]
        h = rms_norm(o, w.post_norm, self.eps, residual=buf.residual)                   # [T, hidden]
        gate, up = _mm(h, w.gate_up).chunk(2, dim=-1)                                   # [T, inter] each
        _mm(F.silu(gate) * up, w.down, out=buf.hidden)                                  # [T, hidden]

    # -- attention and logits (eager in piecewise mode) -------------------------

    def attend(self, i: int, buf: StepBuffers, kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
               metadata: Any) -> None:
        """Layer ``i``'s cache write and attention, from ``buf.qkv`` into ``buf.attn``."""
        h, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        num_tokens = buf.qkv.shape[0]
        qkv = buf.qkv.view(num_tokens, h + 2 * h_kv, d)
        self.attention.forward(i, qkv[:, :h], qkv[:, h: h + h_kv], qkv[:, h + h_kv:], kv_caches[i], metadata,
                               out=buf.attn.view(num_tokens, h, d))

    def compute_logits(self, buf: StepBuffers, logits_indices: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[N, vocab]`` of the rows ``logits_indices`` after the last piece."""
        hidden = buf.hidden.index_select(0, logits_indices)                             # [N, hidden]
        residual = buf.residual.index_select(0, logits_indices)                         # [N, hidden]
        h = rms_norm(hidden, self.weights.final_norm, self.eps, residual=residual)      # [N, hidden]
        return _mm(h, self.weights.lm_head).float()                                     # [N, vocab]

    def forward(self, buf: StepBuffers, kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]], metadata: Any,
                logits_indices: torch.Tensor,
                piece_runner: Callable[[int, StepBuffers], None] | None = None) -> torch.Tensor:
        """The whole step on ``buf`` (inputs already in ``buf.input_ids`` / ``buf.positions``).

        ``piece_runner(index, buf)`` runs a piece (a graph replay in
        piecewise mode); default: ``run_piece``.
        """
        run = piece_runner or self.run_piece
        for i in range(self.num_layers):
            run(i, buf)
            self.attend(i, buf, kv_caches, metadata)
        run(self.num_layers, buf)
        return self.compute_logits(buf, logits_indices)
