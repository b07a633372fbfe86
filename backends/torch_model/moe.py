"""The mixture-of-experts MLP in torch: one shape for Mixtral, Qwen2-MoE and Qwen3-MoE.

Per token (``x`` ``[T, hidden]``)::

    p        = softmax(router(x))                          float32, over all experts
    w, e     = top_k(p)                                    [T, k] each
    w        = w / sum(w)                                  (norm_topk_prob)
    out      = sum_j w_j * down_e(act(gate_e(x)) * up_e(x))
    out     += sigmoid(shared_gate(x)) * shared_mlp(x)     (a shared expert, Qwen2-MoE)

Batched: the ``T * k`` (token, expert) pairs are sorted by expert, and each
expert that got any runs one GEMM pair over its contiguous rows (a grouped
GEMM in a loop, through the device's ``linear``); the weighted rows are
summed back per token. Each token's experts are added in ascending expert
order, as transformers does.
"""

from __future__ import annotations

from typing import Callable

import torch

from model.config import ModelConfig


def route(x: torch.Tensor, router: torch.Tensor, config: ModelConfig,
          linear: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts of each token and their weights: ``(ids [T, k] int64, weights [T, k] in x.dtype)``."""
    logits = linear(x, router, None)                                           # [T, E]
    probs = torch.softmax(logits.float(), dim=-1)                              # [T, E] float32
    weights, ids = torch.topk(probs, config.num_experts_per_tok, dim=-1)       # [T, k] each
    if config.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)                  # [T, k]
    return ids, weights.to(x.dtype)


def moe_forward(x: torch.Tensor, w, config: ModelConfig, linear: Callable,
                act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The MoE MLP of one layer (``w``: its ``LayerWeights``) on ``x`` ``[T, hidden]``; ``[T, hidden]``."""
    num_tokens, k = x.shape[0], config.num_experts_per_tok
    ids, weights = route(x, w.router, config, linear)                          # [T, k] each
    flat = ids.reshape(-1)                                                     # [T*k]
    order = torch.argsort(flat, stable=True)                                   # [T*k]: pairs by expert
    counts = torch.bincount(flat, minlength=config.num_experts).tolist()       # pairs per expert (one host sync)
    token_of = order // k                                                      # [T*k]: each sorted pair's token
    rows = x.index_select(0, token_of)                                         # [T*k, hidden]
    outs = []
    start = 0
    for expert, n in enumerate(counts):
        if n:
            gate, up = linear(rows[start: start + n], w.experts_gate_up[expert], None).chunk(2, dim=-1)  # [n, I]
            outs.append(linear(act(gate) * up, w.experts_down[expert], None))                    # [n, hidden]
            start += n
    expert_out = torch.cat(outs) * weights.reshape(-1).index_select(0, order)[:, None]  # [T*k, hidden]
    out = torch.zeros_like(x).index_add_(0, token_of, expert_out)              # [T, hidden]
    if w.shared_gate_up is not None:
        gate, up = linear(x, w.shared_gate_up, None).chunk(2, dim=-1)          # [T, S] each
        shared = linear(act(gate) * up, w.shared_down, None)                   # [T, hidden]
        out = out + torch.sigmoid(linear(x, w.shared_gate, None)) * shared     # [T, hidden]
    return out
