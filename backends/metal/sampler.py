"""Batched token sampling in MLX: the MLX kernels and draws of the shared sampling plan.

The rules (which rows are greedy, penalised, masked, seeded; what min_p,
top_k and top_p keep) are decided by ``backends.sampling_plan.SamplingPlan``
and run by ``backends.plan_sampler.PlanSampler`` in the order that
``backends/sampler.py`` documents, exactly as for the cpu and cuda backends.
This module holds only their MLX array operations.

Randomness comes from MLX keys (threefry), not torch's generator, so a seeded
request's tokens are reproducible on this backend but differ from the cpu
backend's. A seeded request owns a key made from its seed at its first random
sample; every draw splits it in two (the next key, the draw's key), so the
request's tokens do not depend on which other requests share the batch. A key
re-created after a drop (preemption) first replays one split per token already
generated, so a preempted request continues its stream. Unseeded rows draw from
the sampler's own key, split once per step. The inverse-CDF draw runs in
float32 and never picks a token of zero probability.

``MetalSampler.execute`` runs the plan's stages in ``PlanSampler``'s order but
inside MLX's graph: ``build`` appends them to the (possibly still running)
forward pass, so the token ids, logprob statistics and the advanced keys stay
MLX arrays (a ``LazySample``), and ``finish`` brings them to the host with
one ``mx.eval``: the step's only synchronisation, besides top-p's candidate
growth when a nucleus is wider than its first try. The metal backend's
pending step keeps the ``LazySample`` between the two, so that the next step
can read its tokens on the device (``backends.metal.backend``).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import mlx.core as mx
import numpy as np

from backends.plan_sampler import PlanSampler
from backends.sampling_plan import (DrawPlan, PenaltyPlan, SamplingPlan, SamplingRow, TokenMask, TopKTopP,
                                    bitmask_to_additive)
from scheduler.output import Logprobs


def apply_penalties(logits: mx.array, penalties: PenaltyPlan) -> mx.array:
    """Penalised ``logits`` ``[N, V]``; rows outside ``penalties.rows`` come back unchanged.

    Repetition (HF): tokens seen in prompt + output get positive logits divided
    by the penalty and negative ones multiplied. Then frequency / presence
    (OpenAI): ``logit -= frequency * count + presence * (count > 0)`` over the
    output tokens.
    """
    rows = mx.array(np.asarray(penalties.rows, dtype=np.int64))                           # [P]
    sub = logits[rows]                                                                    # [P, V]
    if penalties.needs_repetition:
        seen = mx.zeros(sub.shape, dtype=mx.bool_)                                        # [P, V]
        if len(penalties.seen_rows):
            seen[mx.array(penalties.seen_rows), mx.array(penalties.seen_token_ids)] = True
        penalty = mx.array(penalties.repetition)[:, None]                                 # [P, 1]
        sub = mx.where(seen, mx.where(sub > 0, sub / penalty, sub * penalty), sub)        # [P, V]
    if penalties.needs_output_penalties:
        counts = mx.zeros(sub.shape, dtype=mx.float32)                                    # [P, V]
        if len(penalties.count_rows):
            counts[mx.array(penalties.count_rows), mx.array(penalties.count_token_ids)] = mx.array(penalties.counts)
        freq = mx.array(penalties.frequency)[:, None]                                     # [P, 1]
        pres = mx.array(penalties.presence)[:, None]                                      # [P, 1]
        sub = sub - (freq * counts + pres * (counts > 0))                                 # [P, V]
    out = mx.array(logits)                                                                # [N, V] a new array
    out[rows] = sub
    return out


def apply_token_mask(logits: mx.array, mask: TokenMask) -> mx.array:
    """``logits`` ``[N, V]`` with the mask applied: biases added, then grammar bitmasks, then bans (a new array)."""
    out = mx.array(logits)                                                                # [N, V]
    if len(mask.bias_rows):
        out = out.at[mx.array(mask.bias_rows), mx.array(mask.bias_token_ids)].add(
            mx.array(mask.bias_values).astype(out.dtype))
    if mask.bitmask is not None:
        additive = mx.array(bitmask_to_additive(mask.bitmask, out.shape[1])).astype(out.dtype)  # [G, V] 0 / -inf
        out = out.at[mx.array(np.asarray(mask.bitmask_rows, dtype=np.int64))].add(additive)    # [N, V]
    if len(mask.rows):
        out[mx.array(mask.rows), mx.array(mask.token_ids)] = -mx.inf
    return out


def apply_min_p(logits: mx.array, min_p_log: np.ndarray) -> mx.array:
    """Mask tokens below ``min_p`` times the row's best, tested in log space (``min_p_log`` ``[R]``)."""
    threshold = mx.max(logits, axis=-1, keepdims=True) + mx.array(min_p_log)[:, None]    # [R, 1]
    return mx.where(logits < threshold, -mx.inf, logits)                                  # [R, V]


def apply_top_k_top_p(logits: mx.array, stage: TopKTopP) -> mx.array:
    """Mask everything outside each row's top-k, then outside its top-p nucleus.

    The nucleus is the smallest set of best tokens whose renormalised mass
    (after top-k) reaches ``top_p``; it is searched among the best
    ``stage.num_candidates`` tokens first, then more while some row's nucleus
    is larger, up to the whole vocabulary (reading one flag on the host: none
    when every row's top-k lies inside the candidates). Tokens tied with the last kept one
    are kept too.
    """
    if logits.shape[1] != stage.vocab_size:
        raise ValueError(f"logits have {logits.shape[1]} columns, the stage was planned for {stage.vocab_size}")
    k = mx.array(stage.k)                                                                 # [R]
    p = mx.array(stage.p)                                                                 # [R]
    num_candidates = stage.num_candidates
    full_total = mx.logsumexp(logits, axis=-1) if stage.needs_full_total else None        # [R]
    while True:
        best = mx.topk(logits, num_candidates, axis=-1)                                   # [R, C] unordered
        values = -mx.sort(-best, axis=-1)                                                 # [R, C] best first
        rank = mx.arange(num_candidates)[None, :]                                         # [1, C]
        values = mx.where(rank >= k[:, None], -mx.inf, values)                            # [R, C]
        inside = k <= num_candidates                                                      # [R]
        total = mx.logsumexp(values, axis=-1)                                             # [R]
        if full_total is not None:
            total = mx.where(inside, total, full_total)                                   # [R]
        probs = mx.exp(values - total[:, None])                                           # [R, C]
        mass = mx.cumsum(probs, axis=-1)                                                  # [R, C]
        keep = (((mass - probs) < p[:, None]) & (values > -mx.inf)) | (rank == 0)         # [R, C]
        if num_candidates == stage.vocab_size or bool((stage.k <= num_candidates).all()):
            break                       # every row's top-k is inside: no nucleus can be wider (no host read)
        incomplete = ~inside & (mass[:, -1] < p)                                          # [R]
        if not mx.any(incomplete).item():
            break
        num_candidates = stage.next_num_candidates(num_candidates)
    last = mx.sum(keep, axis=-1, keepdims=True) - 1                                       # [R, 1]
    threshold = mx.take_along_axis(values, last, axis=1)                                  # [R, 1]
    return mx.where(logits < threshold, -mx.inf, logits)                                  # [R, V]


def inverse_cdf_sample(logits: mx.array, uniform: mx.array) -> mx.array:
    """Token ``[R]`` drawn from each row's softmax of ``logits`` ``[R, V]`` by the uniforms ``[R]``.

    The first token whose cumulative mass exceeds ``u * total``; never a token
    of zero probability (the draw is capped at the row's last possible token).
    """
    vocab = logits.shape[1]
    probs = mx.softmax(logits, axis=-1)                                                   # [R, V]
    cdf = mx.cumsum(probs, axis=-1)                                                       # [R, V]
    target = uniform[:, None] * cdf[:, -1:]                                               # [R, 1]
    picked = mx.sum(cdf <= target, axis=-1)                                               # [R]
    last_possible = mx.max(mx.where(probs > 0, mx.arange(vocab), -1), axis=-1)            # [R]
    return mx.minimum(picked, last_possible)                                              # [R]


class LazySample(NamedTuple):
    """One step's sampling still in MLX's graph (``MetalSampler.build``); ``MetalSampler.finish`` reads it."""

    tokens: mx.array                       # [N] int32, in row order
    stats: list[mx.array]                  # [lp [M], rank [M]] (+ top ids [M, k], top logprobs [M, k]); [] none asked
    keys: list[mx.array]                   # the sampler's keys as this step leaves them: evaluated with it
    logprob_rows: tuple[int, ...]          # rows that asked for logprobs
    num_top_logprobs: tuple[int, ...]      # top-k of each of logprob_rows
    num_top: int                           # the largest of num_top_logprobs (0: none)


class MetalSampler(PlanSampler[mx.array, mx.array]):
    """Samples one token per row in MLX; owns the per-request seeded keys."""

    # The stages' kernels (the module functions above, tested against the torch ones).
    _apply_penalties = staticmethod(apply_penalties)
    _apply_token_mask = staticmethod(apply_token_mask)
    _apply_min_p = staticmethod(apply_min_p)
    _apply_top_k_top_p = staticmethod(apply_top_k_top_p)

    def __init__(self, eos_token_ids: Iterable[int] = (), seed: int = 0) -> None:
        super().__init__(eos_token_ids)
        self._key = mx.random.key(int(seed))
        mx.eval(self._key)          # no lazy array crosses to the engine's step thread (MLX streams are per thread)

    def sample(self, logits: mx.array, rows: Sequence[SamplingRow]) -> tuple[list[int], list[Logprobs | None]]:
        """One token (and optional logprobs) for each of ``rows`` from ``logits`` ``[N, V]`` float32.

        ``rows`` are ``ScheduledRequest``-like: ``request_id``,
        ``sampling_params``, ``prompt_token_ids``, ``output_token_ids``.
        """
        return self.run(logits, rows)

    def execute(self, logits: mx.array, plan: SamplingPlan) -> tuple[list[int], list[Logprobs | None]]:
        """``plan``'s stages on ``logits`` ``[N, V]`` in MLX, then one ``mx.eval`` (see the module docstring)."""
        return self.finish(self.build(logits, plan))

    def start(self, logits: mx.array, rows: Sequence[SamplingRow]) -> LazySample:
        """``run`` without the wait: the plan of ``rows`` built and its stages appended to ``logits``' graph."""
        return self.build(logits, self.plan(logits, rows))

    def build(self, logits: mx.array, plan: SamplingPlan) -> LazySample:
        """``plan``'s stages appended to the graph of ``logits`` ``[N, V]``: nothing is evaluated (but top-p's
        candidate growth, which reads one flag)."""
        raw_logprobs = self._log_softmax(logits, plan.logprob_rows) if plan.logprob_rows else None  # [M, V]
        if plan.penalties is not None:
            logits = self._apply_penalties(logits, plan.penalties)                        # [N, V]
        if plan.banned is not None:
            logits = self._apply_token_mask(logits, plan.banned)                          # [N, V]
        if plan.is_all_greedy:
            tokens = mx.argmax(logits, axis=-1).astype(mx.int32)                          # [N]
        else:
            parts, order = [], []
            if plan.greedy_rows:
                parts.append(mx.argmax(logits[mx.array(plan.greedy_rows)], axis=-1).astype(mx.int32))
                order.extend(plan.greedy_rows)
            parts.append(self._draw_tokens(logits, plan.draws))                           # [R]
            order.extend(plan.draws.rows)
            tokens = mx.concatenate(parts)[mx.array(np.argsort(order).astype(np.int32))]  # [N] in row order
        stats: list[mx.array] = []
        num_top = max(plan.num_top_logprobs, default=0)
        if raw_logprobs is not None:
            stats = self._logprob_arrays(raw_logprobs, tokens[mx.array(plan.logprob_rows)], num_top)
        return LazySample(tokens, stats, [self._key, *self._seeded.values()], plan.logprob_rows,
                          plan.num_top_logprobs, num_top)

    def finish(self, lazy: LazySample) -> tuple[list[int], list[Logprobs | None]]:
        """Wait for ``lazy`` (one ``mx.eval``: the step's host synchronisation) and read it on the host."""
        mx.eval(lazy.tokens, lazy.stats, lazy.keys)          # the step's one host synchronisation
        token_ids = lazy.tokens.tolist()
        logprobs: list[Logprobs | None] = [None] * len(token_ids)
        if lazy.stats:
            lps, ranks = lazy.stats[0].tolist(), lazy.stats[1].tolist()
            top_ids, top_lps = ((lazy.stats[2].tolist(), lazy.stats[3].tolist()) if lazy.num_top
                                else ([[]] * len(lps),) * 2)
            for j, (i, k) in enumerate(zip(lazy.logprob_rows, lazy.num_top_logprobs)):
                logprobs[i] = Logprobs(token_id=token_ids[i], logprob=lps[j], rank=ranks[j],
                                       top=list(zip(top_ids[j][:k], top_lps[j][:k])))
        return token_ids, logprobs

    def _draw_tokens(self, logits: mx.array, draws: DrawPlan) -> mx.array:
        """Lazy tokens ``[R]`` of the drawing rows (``PlanSampler._draw``'s stages; keys advanced, not evaluated)."""
        scaled, uniforms = self._draw_inputs(logits, draws)                                # [R, V], [1] each
        return inverse_cdf_sample(scaled, mx.concatenate(uniforms)).astype(mx.int32)      # [R]

    def _logprob_arrays(self, logprobs: mx.array, sampled: mx.array, num_top: int) -> list[mx.array]:
        """Lazy ``[lp [M], rank [M]]`` of ``sampled`` ``[M]`` under ``logprobs`` ``[M, V]``, plus the best
        ``num_top`` ids ``[M, k]`` and their logprobs ``[M, k]`` when ``num_top``."""
        sampled_lp = mx.take_along_axis(logprobs, sampled[:, None], axis=1)               # [M, 1]
        ranks = mx.sum(logprobs > sampled_lp, axis=-1) + 1                                # [M]
        if not num_top:
            return [sampled_lp[:, 0], ranks]
        candidates = mx.argpartition(-logprobs, kth=num_top - 1, axis=-1)[:, :num_top]    # [M, k]
        values = mx.take_along_axis(logprobs, candidates, axis=1)                         # [M, k]
        order = mx.argsort(-values, axis=-1)                                              # [M, k]
        return [sampled_lp[:, 0], ranks, mx.take_along_axis(candidates, order, axis=1),
                mx.take_along_axis(values, order, axis=1)]

    def _log_softmax(self, logits: mx.array, rows: tuple[int, ...]) -> mx.array:
        raw = logits[mx.array(rows)]                                                      # [M, V]
        return raw - mx.logsumexp(raw, axis=-1, keepdims=True)                            # [M, V]

    def _argmax(self, logits: mx.array, rows: tuple[int, ...] | None) -> list[int]:
        return mx.argmax(logits if rows is None else logits[mx.array(rows)], axis=-1).tolist()

    def _scale(self, logits: mx.array, rows: tuple[int, ...], temperature: np.ndarray) -> mx.array:
        return logits[mx.array(rows)] / mx.array(temperature)[:, None]                    # [R, V]

    def _draw_unseeded(self, n: int) -> mx.array:
        self._key, step_key = mx.random.split(self._key)
        return mx.random.uniform(shape=(n,), key=step_key)                                # [n]

    def _new_stream(self, seed: int, num_drawn: int) -> mx.array:
        key = mx.random.key(int(seed))
        for _ in range(num_drawn):
            key = mx.random.split(key)[0]
        return key

    def _draw_seeded(self, stream: mx.array) -> tuple[mx.array, mx.array]:
        next_key, draw_key = mx.random.split(stream)
        return mx.random.uniform(shape=(1,), key=draw_key), next_key                      # [1]

    def _settle_streams(self) -> None:
        mx.eval(self._key, list(self._seeded.values()))                                   # keep the key graphs flat

    def _inverse_cdf(self, logits: mx.array, uniforms: list[mx.array]) -> list[int]:
        return inverse_cdf_sample(logits, mx.concatenate(uniforms)).tolist()

    def _logprob_stats(self, logprobs: mx.array, token_ids: list[int], num_top: int
                       ) -> tuple[list[float], list[int], list[list[int]], list[list[float]]]:
        stats = [a.tolist() for a in self._logprob_arrays(logprobs, mx.array(token_ids), num_top)]
        return stats[0], stats[1], *((stats[2], stats[3]) if num_top else ([[] for _ in token_ids],) * 2)
