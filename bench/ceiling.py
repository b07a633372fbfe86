"""A run's matmul work against what this machine's GEMM can do (``bench offline``).

``MatmulFlops`` counts, from the ``ModelConfig`` alone, the multiply-adds of
every projection a token goes through (2 FLOPs each): the layers' Q/K/V, O
and MLP (for a mixture of experts the router, the ``num_experts_per_tok``
routed experts and the shared expert) and, for each token that is sampled,
the LM head. Attention's own score and value products (``QK^T``, ``PV``) grow
with the context and are counted apart (full attention assumed for every
layer, so a sliding window is over-counted).

``calibrate_gemm`` times ``torch.mm`` at the model's prefill shapes (one
layer's projections for a chunk of ``rows`` tokens) in the
same process, threads and dtype as the run, for about ``seconds``; the
ceiling of a run is its matmul FLOPs at that rate, and the fraction reached
is that ideal time over the measured time. On a CPU in float32 it also
times, for as long, oneDNN with prepacked weights at the same shapes (what
the cpu backend runs for more than a few rows, ``backends.cpu.linear``), and
reports that rate beside the ceiling; the ceiling stays ``torch.mm``'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from model.config import ModelConfig


@dataclass(frozen=True)
class MatmulFlops:
    """FLOPs (2 per multiply-add) of one token's projections under a ``ModelConfig``."""

    per_layer_token: int             # every layer's projections for one token
    lm_head: int                     # the LM head for one sampled row
    attention_per_key: int           # QK^T and PV of one query against one key, all layers

    def __post_init__(self) -> None:
        for name in ("per_layer_token", "lm_head", "attention_per_key"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def of(cls, config: ModelConfig) -> "MatmulFlops":
        """The counts of ``config``'s model."""
        hidden = config.hidden_size
        q_dim = config.num_attention_heads * config.head_dim
        kv_dim = config.num_key_value_heads * config.head_dim
        total = 0
        for i in range(config.num_hidden_layers):
            macs = hidden * (q_dim + 2 * kv_dim) + q_dim * hidden            # Q, K, V and O
            if config.is_moe_layer(i):
                macs += hidden * config.num_experts                          # router
                macs += config.num_experts_per_tok * 3 * hidden * config.moe_intermediate_size
                if config.shared_expert_intermediate_size:
                    macs += 3 * hidden * config.shared_expert_intermediate_size + hidden
            else:
                macs += 3 * hidden * config.intermediate_size                # gate, up, down
            total += 2 * macs
        return cls(per_layer_token=total, lm_head=2 * hidden * config.vocab_size,
                   attention_per_key=2 * 2 * q_dim * config.num_hidden_layers)

    @property
    def per_prefill_token(self) -> int:
        """A prompt token: the layers only (its logits are not computed)."""
        return self.per_layer_token

    @property
    def per_decode_token(self) -> int:
        """A decoded token: the layers and the LM head."""
        return self.per_layer_token + self.lm_head


def run_flops(flops: MatmulFlops, requests: list[tuple[int, int, int]]) -> dict:
    """Matmul and attention FLOPs of a run of ``(prompt_tokens, cached_prompt_tokens, output_tokens)`` requests.

    Tokens through the layers: the computed prompt tokens and every output
    token but the last (which is never fed back); LM-head rows: one per output
    token. A query at position ``p`` attends ``p + 1`` keys.
    """
    layer_tokens = lm_rows = attn_keys = 0
    for prompt, cached, out in requests:
        fed = max(0, out - 1)
        layer_tokens += prompt - cached + fed
        lm_rows += out
        last = prompt + fed                          # one past the last position computed
        attn_keys += (last * (last + 1) - cached * (cached + 1)) // 2
    matmul = layer_tokens * flops.per_layer_token + lm_rows * flops.lm_head
    return {"matmul_flops": matmul, "attention_flops": attn_keys * flops.attention_per_key,
            "layer_tokens": layer_tokens, "lm_head_rows": lm_rows,
            "flops_per_prefill_token": flops.per_prefill_token, "flops_per_decode_token": flops.per_decode_token}


def gemm_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """``(in, out)`` of one layer's projections, fused as the backends run them (Q/K/V, O, gate/up, down)."""
    hidden = config.hidden_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    inter = config.intermediate_size or config.moe_intermediate_size
    return [(hidden, q_dim + 2 * kv_dim), (q_dim, hidden), (hidden, 2 * inter), (inter, hidden)]


def calibrate_gemm(config: ModelConfig, *, rows: int = 2048, seconds: float = 1.5, dtype: str = "float32",
                   device: str = "cpu", onednn: bool = True) -> dict:
    """This process's ``torch.mm`` rate at ``config``'s prefill shapes: ``{"gflops", "seconds", "rows"}``.

    Each round multiplies a ``[rows, in]`` chunk by every shape once (one
    warm-up round first); rounds repeat until ``seconds`` have passed. The
    rate is the FLOPs of the timed rounds over their time. On cuda the
    device is synchronised around each round. With ``onednn`` (cpu, float32,
    where torch has oneDNN) the same rounds against prepacked weights give
    ``"onednn_gflops"`` too.
    """
    if rows < 1 or seconds <= 0:
        raise ValueError(f"rows must be >= 1 and seconds > 0, got {rows}, {seconds}")
    import torch

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for k, n in gemm_shapes(config):
        x = torch.randn(rows, k, generator=gen).to(device=device, dtype=tdtype)         # [rows, in]
        w = torch.randn(n, k, generator=gen).to(device=device, dtype=tdtype) * k ** -0.5   # [out, in]
        pairs.append((x, w))
    round_flops = sum(2 * rows * w.shape[0] * w.shape[1] for _, w in pairs)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    def one_round() -> None:
        for x, w in pairs:
            torch.mm(x, w.t())                                                           # [rows, out]
        sync()

    rounds, elapsed = _timed_rounds(one_round, seconds)
    result = {"gflops": rounds * round_flops / elapsed / 1e9, "seconds": elapsed, "rows": rows, "rounds": rounds}
    if onednn and device == "cpu" and tdtype == torch.float32:
        from backends.cpu.linear import ONEDNN_PACK_ROWS, onednn_available

        if onednn_available():
            mk = torch.ops.mkldnn
            packed = [(x, mk._reorder_linear_weight(w, ONEDNN_PACK_ROWS)) for x, w in pairs]

            def onednn_round() -> None:
                for x, wp in packed:
                    mk._linear_pointwise(x, wp, None, "none", [], "")                    # [rows, out]

            rounds, elapsed = _timed_rounds(onednn_round, seconds)
            result["onednn_gflops"] = rounds * round_flops / elapsed / 1e9
    return result


def _timed_rounds(one_round, seconds: float) -> tuple[int, float]:
    """One warm-up call, then calls until ``seconds`` have passed: ``(calls, seconds taken)``."""
    one_round()
    rounds, t0 = 0, time.perf_counter()
    while True:
        one_round()
        rounds += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return rounds, elapsed


def ceiling_report(flops: dict, gemm: dict, elapsed_s: float) -> dict:
    """The run's ideal matmul time at the calibrated rate and the fraction of it the run reached."""
    ideal = flops["matmul_flops"] / (gemm["gflops"] * 1e9)
    return {**flops, "gemm_gflops": gemm["gflops"], "gemm_calibration": gemm,
            "achieved_matmul_gflops": flops["matmul_flops"] / elapsed_s / 1e9 if elapsed_s > 0 else 0.0,
            "ideal_matmul_s": ideal, "ceiling_fraction": ideal / elapsed_s if elapsed_s > 0 else 0.0}


def _flop(x: float) -> str:
    """FLOPs with a readable unit."""
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOP"


def format_ceiling(c: dict) -> str:
    """The ceiling figures as a few terminal lines."""
    return "\n".join([
        f"  matmul work: {_flop(c['matmul_flops'])} ({c['layer_tokens']} tokens x "
        f"{c['flops_per_prefill_token'] / 1e6:.1f} MFLOP through the layers, {c['lm_head_rows']} LM-head rows x "
        f"{(c['flops_per_decode_token'] - c['flops_per_prefill_token']) / 1e6:.1f} MFLOP; "
        f"{c['flops_per_decode_token'] / 1e6:.1f} MFLOP per decoded token); attention "
        f"{_flop(c['attention_flops'])} apart",
        f"  GEMM calibration: torch.mm at the prefill shapes ({c['gemm_calibration']['rows']} rows) "
        f"{c['gemm_gflops']:.1f} GFLOP/s over {c['gemm_calibration']['seconds']:.1f} s"
        + (f" (oneDNN, prepacked weights: {c['gemm_calibration']['onednn_gflops']:.1f} GFLOP/s)"
           if "onednn_gflops" in c["gemm_calibration"] else ""),
        f"  ceiling: the matmuls alone need {c['ideal_matmul_s']:.3g} s; the run reached "
        f"{c['achieved_matmul_gflops']:.1f} GFLOP/s = {c['ceiling_fraction']:.1%} of the machine's ceiling",
    ])
