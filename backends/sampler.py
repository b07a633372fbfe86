"""Batched, device-agnostic token sampling in torch (modelled on vLLM's sampler).

Order of operations on the logits ``[N, V]`` of the N requests that sample:

1. logprobs (where asked) from ``log_softmax`` of the RAW model logits;
2. repetition penalty (HF: over prompt + output), then frequency and presence
   penalties (OpenAI: over output tokens only);
3. the token mask, after the penalties and before any temperature / top-k:
   ``logit_bias`` added, then the structured-output bitmask (tokens the
   grammar does not allow at ``-inf``), then ``min_tokens`` (EOS and
   ``stop_token_ids`` at ``-inf`` while the output is shorter);
4. greedy rows (temperature ~0 or top_k == 1): argmax, lowest id on ties;
5. random rows: temperature → min_p → top_k → top_p → inverse-CDF draw: one
   uniform per row from the request's own generator (seeded requests) or the
   sampler's, looked up in the row's float64 cumulative distribution (exact
   like ``torch.multinomial``, without drawing a random number per token).

What each stage does to which rows is decided once per step, framework-free,
by ``backends.sampling_plan.SamplingPlan``; ``backends.plan_sampler`` runs the
stages in this order for torch and MLX alike. This module holds the torch
kernels of the stages and the torch draws.

A seeded request gets a ``torch.Generator`` seeded with its seed at its first
random sample, kept until ``drop``: it draws exactly one number per sampled
token, so its tokens do not depend on which other requests share the batch.
A generator re-created after a drop (preemption) first skips one draw per
token already generated, so a preempted request continues its stream.
Greedy batches without penalties take a fast path: one argmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from backends.plan_sampler import PlanSampler
from backends.sampling_plan import PenaltyPlan, SamplingRow, TokenMask, TopKTopP, bitmask_to_additive
from scheduler.output import Logprobs

__all__ = ["Sampler", "SamplerOutput", "SamplingRow", "apply_min_p", "apply_penalties", "apply_token_mask",
           "apply_top_k_top_p"]


@dataclass
class SamplerOutput:
    """Sampled token and optional logprobs per row, in row order."""

    token_ids: list[int]              # one sampled token per row
    logprobs: list[Logprobs | None]   # per row; None where the request asked for none


def apply_penalties(logits: torch.Tensor, penalties: PenaltyPlan) -> torch.Tensor:
    """Penalised copy of ``logits`` ``[N, V]``; rows outside ``penalties.rows`` are unchanged.

    Repetition (HF): tokens seen in prompt + output get positive logits divided
    by the penalty and negative ones multiplied. Then frequency / presence
    (OpenAI): ``logit -= frequency * count + presence * (count > 0)`` over the
    output tokens.
    """
    device = logits.device
    rows = torch.as_tensor(penalties.rows, device=device)                                # [P]
    sub = logits[rows]                                                                   # [P, V]
    if penalties.needs_repetition:
        seen = torch.zeros(sub.shape, dtype=torch.bool, device=device)                   # [P, V]
        seen[torch.as_tensor(penalties.seen_rows, device=device),
             torch.as_tensor(penalties.seen_token_ids, device=device)] = True
        penalty = torch.as_tensor(penalties.repetition, device=device)[:, None]          # [P, 1]
        sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)  # [P, V]
    if penalties.needs_output_penalties:
        counts = torch.zeros(sub.shape, device=device)                                   # [P, V]
        counts[torch.as_tensor(penalties.count_rows, device=device),
               torch.as_tensor(penalties.count_token_ids, device=device)] = torch.as_tensor(penalties.counts,
                                                                                            device=device)
        freq = torch.as_tensor(penalties.frequency, device=device)[:, None]              # [P, 1]
        pres = torch.as_tensor(penalties.presence, device=device)[:, None]               # [P, 1]
        sub = sub - (freq * counts + pres * (counts > 0))                                # [P, V]
    logits = logits.clone()                                                              # [N, V]
    logits[rows] = sub
    return logits


def apply_token_mask(logits: torch.Tensor, mask: TokenMask) -> torch.Tensor:
    """Copy of ``logits`` ``[N, V]`` with the mask applied: biases added, then grammar bitmasks, then bans."""
    device = logits.device
    logits = logits.clone()                                                              # [N, V]
    if len(mask.bias_rows):
        logits.index_put_((torch.as_tensor(mask.bias_rows, device=device),
                           torch.as_tensor(mask.bias_token_ids, device=device)),
                          torch.as_tensor(mask.bias_values, device=device).to(logits.dtype), accumulate=True)
    if mask.bitmask is not None:
        additive = torch.from_numpy(bitmask_to_additive(mask.bitmask, logits.shape[1]))  # [G, V] 0 / -inf
        rows = torch.as_tensor(mask.bitmask_rows, device=device)                         # [G]
        logits.index_add_(0, rows, additive.to(device=device, dtype=logits.dtype))       # [N, V]
    if len(mask.rows):
        logits[torch.as_tensor(mask.rows, device=device),
               torch.as_tensor(mask.token_ids, device=device)] = float("-inf")
    return logits


def apply_min_p(logits: torch.Tensor, min_p_log: np.ndarray) -> torch.Tensor:
    """Mask tokens whose probability is below ``min_p`` times the row's best.

    ``p_i < min_p * p_max`` is tested in log space, ``l_i < l_max + log(min_p)``
    (``min_p_log`` ``[R]``, from ``sampling_plan.plan_min_p``): no softmax needed.
    """
    floor = torch.as_tensor(min_p_log, device=logits.device).to(logits.dtype)           # [R]
    threshold = logits.amax(dim=-1, keepdim=True) + floor[:, None]                       # [R, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))                         # [R, V]


def apply_top_k_top_p(logits: torch.Tensor, stage: TopKTopP) -> torch.Tensor:
    """Mask everything outside each row's top-k, then outside its top-p nucleus.

    The nucleus is the smallest set of best tokens whose renormalised mass
    (after top-k) reaches ``top_p``. It is searched among the best
    ``stage.num_candidates`` tokens first, then more while some row's nucleus
    is larger, up to a full sort. Tokens tied with the last kept one are kept too.
    """
    if logits.shape[1] != stage.vocab_size:
        raise ValueError(f"logits have {logits.shape[1]} columns, the stage was planned for {stage.vocab_size}")
    device = logits.device
    k = torch.as_tensor(stage.k, device=device)                                          # [R]
    p = torch.as_tensor(stage.p, device=device)                                          # [R]
    num_candidates = stage.num_candidates
    full_total = logits.logsumexp(-1) if stage.needs_full_total else None                # [R]
    while True:
        values = logits.topk(num_candidates, dim=-1).values                              # [R, C]
        rank = torch.arange(num_candidates, device=device)[None, :]                      # [1, C]
        values = values.masked_fill(rank >= k[:, None], float("-inf"))                   # [R, C]
        inside = k <= num_candidates                                                     # [R]
        total = values.logsumexp(-1)                                                     # [R]
        if full_total is not None:
            total = torch.where(inside, total, full_total)                               # [R]
        probs = (values - total[:, None]).exp()                                          # [R, C]
        mass = probs.cumsum(dim=-1)                                                      # [R, C]
        keep = ((mass - probs) < p[:, None]) & (values > float("-inf"))                  # [R, C]
        keep[:, 0] = True
        incomplete = ~inside & (mass[:, -1] < p)                                         # [R]
        if num_candidates == stage.vocab_size or not bool(incomplete.any()):
            break
        num_candidates = stage.next_num_candidates(num_candidates)
    last = keep.sum(dim=-1, keepdim=True) - 1                                            # [R, 1]
    threshold = values.gather(1, last)                                                   # [R, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))                         # [R, V]


class Sampler(PlanSampler[torch.Tensor, torch.Generator]):
    """Samples one token per row in torch; owns the per-request seeded generators."""

    # The stages' kernels (the module functions above, tested on their own).
    _apply_penalties = staticmethod(apply_penalties)
    _apply_token_mask = staticmethod(apply_token_mask)
    _apply_min_p = staticmethod(apply_min_p)
    _apply_top_k_top_p = staticmethod(apply_top_k_top_p)

    def __init__(self, eos_token_ids: Iterable[int] = (), seed: int = 0, device: torch.device | str = "cpu",
                 argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """``argmax``: a faster ``t.argmax(-1)`` for the device's float32 ``[N, V]`` logits with the same
        answers (the cpu backend's native one: torch's runs a batch's rows on one core)."""
        super().__init__(eos_token_ids)
        self.device = torch.device(device)
        self._fast_argmax = argmax
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(int(seed))

    def sample_rows(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> tuple[list[int], list[Logprobs | None]]:
        """``sample`` in inference mode, as ``(token_ids, logprobs)`` (what ``backends.base.run_step`` takes)."""
        with torch.inference_mode():
            return self.run(logits, rows)

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """Sample one token for each of ``rows`` from ``logits`` ``[N, V]`` (float32)."""
        token_ids, logprobs = self.run(logits, rows)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    def _log_softmax(self, logits: torch.Tensor, rows: tuple[int, ...]) -> torch.Tensor:
        return torch.log_softmax(logits[list(rows)].float(), dim=-1)                     # [M, V]

    def _argmax(self, logits: torch.Tensor, rows: tuple[int, ...] | None) -> list[int]:
        picked = logits if rows is None else logits[list(rows)]                          # [R, V]
        if self._fast_argmax is not None and picked.dtype == torch.float32 and picked.is_cpu \
                and picked.dim() == 2 and picked.stride(-1) == 1:
            return self._fast_argmax(picked).tolist()
        return picked.argmax(dim=-1).tolist()

    def _scale(self, logits: torch.Tensor, rows: tuple[int, ...], temperature: np.ndarray) -> torch.Tensor:
        return logits[list(rows)] / torch.as_tensor(temperature, device=logits.device)[:, None]  # [R, V]

    def _draw_unseeded(self, n: int) -> torch.Tensor:
        return torch.rand(n, dtype=torch.float64, device=self.device, generator=self._generator)  # [n]

    def _new_stream(self, seed: int, num_drawn: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(seed))
        if num_drawn:
            torch.rand(num_drawn, dtype=torch.float64, device=self.device, generator=generator)
        return generator

    def _draw_seeded(self, stream: torch.Generator) -> tuple[torch.Tensor, torch.Generator]:
        return torch.rand(1, dtype=torch.float64, device=self.device, generator=stream), stream  # [1]

    def _inverse_cdf(self, logits: torch.Tensor, uniforms: list[torch.Tensor]) -> list[int]:
        cdf = torch.softmax(logits.double(), dim=-1).cumsum_(dim=-1)                     # [R, V]
        uniform = torch.cat(uniforms)[:, None]                                           # [R, 1]
        picked = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)              # [R, 1]
        return picked.clamp_(max=logits.shape[1] - 1)[:, 0].tolist()

    def _logprob_stats(self, logprobs: torch.Tensor, token_ids: list[int], num_top: int
                       ) -> tuple[list[float], list[int], list[list[int]], list[list[float]]]:
        sampled = torch.as_tensor(token_ids, device=logprobs.device)[:, None]            # [M, 1]
        sampled_lp = logprobs.gather(1, sampled)                                         # [M, 1]
        ranks = (logprobs > sampled_lp).sum(dim=-1) + 1                                  # [M]
        top_lp, top_ids = logprobs.topk(num_top, dim=-1) if num_top else (logprobs[:, :0], sampled[:, :0])  # [M, k]
        return sampled_lp[:, 0].tolist(), ranks.tolist(), top_ids.tolist(), top_lp.tolist()
