"""Batched token sampling in MLX, with the features of the cpu ``Sampler``.

Same order of operations on the logits ``[N, V]`` of the N requests that sample
as ``backends/sampler.py``:

1. logprobs (where asked) from the log-softmax of the RAW model logits;
2. repetition penalty (HF: over prompt + output), then frequency and presence
   penalties (OpenAI: over output tokens only);
3. ``min_tokens``: EOS and ``stop_token_ids`` masked while the output is shorter;
4. greedy rows (temperature ~0 or top_k == 1): argmax, lowest id on ties;
5. random rows: temperature → min_p → top_k → top_p → inverse-CDF draw: one
   uniform per row, looked up in the row's cumulative distribution.

Randomness comes from MLX keys (threefry), not torch's generator, so a seeded
request's tokens are reproducible on this backend but differ from the cpu
backend's. A seeded request owns a key made from its seed at its first random
sample; every draw splits it in two (the next key, the draw's key), so the
request's tokens do not depend on which other requests share the batch. A key
re-created after a drop (preemption) first replays one split per token already
generated, so a preempted request continues its stream. Unseeded rows draw from
the sampler's own key, split once per step.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import mlx.core as mx
import numpy as np

from scheduler.output import Logprobs

# Temperatures below this are treated as greedy (dividing by them overflows).
GREEDY_TEMPERATURE = 1e-5
# top_p looks for its nucleus among this many best tokens first, then 16x more,
# up to the whole vocabulary.
TOP_P_CANDIDATES = 64


class MetalSampler:
    """Samples one token per row; owns the per-request seeded keys."""

    def __init__(self, eos_token_ids: Iterable[int] = (), seed: int = 0) -> None:
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self._key = mx.random.key(int(seed))
        mx.eval(self._key)          # no lazy array crosses to the engine's step thread (MLX streams are per thread)
        self._seeded: dict[str, mx.array] = {}

    def drop(self, request_ids: Iterable[str]) -> None:
        """Forget the per-request state (seeded keys) of ``request_ids``."""
        for request_id in request_ids:
            self._seeded.pop(request_id, None)

    def clear(self) -> None:
        """Forget every request's state."""
        self._seeded.clear()

    @property
    def num_seeded_generators(self) -> int:
        return len(self._seeded)

    def sample(self, logits: mx.array, rows: Sequence) -> tuple[list[int], list[Logprobs | None]]:
        """One token (and optional logprobs) for each of ``rows`` from ``logits`` ``[N, V]`` float32.

        ``rows`` are ``ScheduledRequest``-like: ``request_id``,
        ``sampling_params``, ``prompt_token_ids``, ``output_token_ids``.
        """
        if logits.ndim != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [N, V] with N = {len(rows)} rows, got {tuple(logits.shape)}")
        params = [r.sampling_params for r in rows]
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = None
        if logprob_rows:
            raw = logits[mx.array(logprob_rows)]                                          # [M, V]
            raw_logprobs = raw - mx.logsumexp(raw, axis=-1, keepdims=True)                # [M, V]

        greedy = [p.temperature < GREEDY_TEMPERATURE or p.top_k == 1 for p in params]
        logits = self._apply_constraints(logits, rows, params)                            # [N, V]
        if all(greedy):
            token_ids = mx.argmax(logits, axis=-1).tolist()
        else:
            token_ids = self._sample_mixed(logits, rows, params, greedy)
        logprobs: list[Logprobs | None] = [None] * len(rows)
        if raw_logprobs is not None:
            picked = [token_ids[i] for i in logprob_rows]
            for row, lp in zip(logprob_rows, gather_logprobs(raw_logprobs, picked,
                                                             [params[i].logprobs for i in logprob_rows])):
                logprobs[row] = lp
        return token_ids, logprobs

    def _apply_constraints(self, logits: mx.array, rows: Sequence, params: list) -> mx.array:
        """Penalties and min_tokens masking; returns ``logits`` itself when neither applies."""
        if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
            logits = apply_penalties(
                logits,
                [r.prompt_token_ids for r in rows],
                [r.output_token_ids for r in rows],
                [p.repetition_penalty for p in params],
                [p.presence_penalty for p in params],
                [p.frequency_penalty for p in params],
            )                                                                             # [N, V]
        vocab = logits.shape[1]
        masked_rows, masked_ids = [], []
        for i, (r, p) in enumerate(zip(rows, params)):
            if len(r.output_token_ids) < p.min_tokens:
                stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
                stop_ids = [t for t in stop_ids if t < vocab]
                masked_rows += [i] * len(stop_ids)
                masked_ids += stop_ids
        if masked_rows:
            hits = mx.zeros(logits.shape, dtype=mx.float32).at[
                mx.array(masked_rows), mx.array(masked_ids)].add(1.0)                    # [N, V]
            logits = mx.where(hits > 0, -mx.inf, logits)                                  # [N, V]
        return logits

    def _sample_mixed(self, logits: mx.array, rows: Sequence, params: list, greedy: list[bool]) -> list[int]:
        token_ids = [0] * len(rows)
        greedy_rows = [i for i, g in enumerate(greedy) if g]
        if greedy_rows:
            for i, token in zip(greedy_rows, mx.argmax(logits[mx.array(greedy_rows)], axis=-1).tolist()):
                token_ids[i] = token
        random_rows = [i for i, g in enumerate(greedy) if not g]
        sub = [params[i] for i in random_rows]
        temperature = mx.array([p.temperature for p in sub], dtype=mx.float32)            # [R]
        scaled = logits[mx.array(random_rows)] / temperature[:, None]                     # [R, V]
        if any(p.min_p > 0 for p in sub):
            scaled = apply_min_p(scaled, [p.min_p for p in sub])                          # [R, V]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in sub):
            scaled = apply_top_k_top_p(scaled, [p.top_k for p in sub], [p.top_p for p in sub])  # [R, V]
        uniform = mx.concatenate(self._uniforms(rows, random_rows, sub))                  # [R]
        for i, token in zip(random_rows, inverse_cdf_sample(scaled, uniform).tolist()):
            token_ids[i] = token
        return token_ids

    def _uniforms(self, rows: Sequence, random_rows: list[int], sub: list) -> list[mx.array]:
        """One uniform in [0, 1) per random row ``[1]`` each, in row order."""
        unseeded = [j for j, p in enumerate(sub) if p.seed is None]
        drawn: dict[int, mx.array] = {}
        if unseeded:
            self._key, step_key = mx.random.split(self._key)
            values = mx.random.uniform(shape=(len(unseeded),), key=step_key)              # [U]
            drawn.update((j, values[k:k + 1]) for k, j in enumerate(unseeded))
        for j, p in enumerate(sub):
            if p.seed is not None:
                row = rows[random_rows[j]]
                key = self._seeded_key(row.request_id, p.seed, len(row.output_token_ids))
                self._seeded[row.request_id], draw_key = mx.random.split(key)
                drawn[j] = mx.random.uniform(shape=(1,), key=draw_key)                    # [1]
        mx.eval(self._key, list(self._seeded.values()))                                   # keep the key graphs flat
        return [drawn[j] for j in range(len(sub))]

    def _seeded_key(self, request_id: str, seed: int, num_drawn: int) -> mx.array:
        """The request's key; a new one replays the ``num_drawn`` splits made before."""
        key = self._seeded.get(request_id)
        if key is None:
            key = mx.random.key(int(seed))
            for _ in range(num_drawn):
                key = mx.random.split(key)[0]
        return key


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


def gather_logprobs(logprobs: mx.array, token_ids: list[int], num_top: list[int]) -> list[Logprobs]:
    """Logprob, rank and top-k of each row's sampled token from ``logprobs`` ``[M, V]``."""
    sampled = mx.array(token_ids)[:, None]                                                # [M, 1]
    sampled_lp = mx.take_along_axis(logprobs, sampled, axis=1)                            # [M, 1]
    ranks = mx.sum(logprobs > sampled_lp, axis=-1) + 1                                    # [M]
    k = max(num_top)
    if k:
        candidates = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]               # [M, k]
        values = mx.take_along_axis(logprobs, candidates, axis=1)                        # [M, k]
        order = mx.argsort(-values, axis=-1)                                             # [M, k]
        top_ids = mx.take_along_axis(candidates, order, axis=1).tolist()
        top_lp = mx.take_along_axis(values, order, axis=1).tolist()
    else:
        top_ids = top_lp = [[] for _ in token_ids]
    result = []
    for i, (lp, rank) in enumerate(zip(sampled_lp[:, 0].tolist(), ranks.tolist())):
        top = list(zip(top_ids[i][: num_top[i]], top_lp[i][: num_top[i]]))
        result.append(Logprobs(token_id=token_ids[i], logprob=lp, rank=rank, top=top))
    return result


def token_counts(seqs: Sequence[Sequence[int]], vocab: int) -> mx.array:
    """How often each token id occurs in each sequence: ``[len(seqs), vocab]`` float32."""
    row_ids = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
    token_ids = np.clip(np.fromiter((t for s in seqs for t in s), dtype=np.int64), 0, vocab)
    counts = mx.zeros((len(seqs), vocab + 1), dtype=mx.float32)                           # [R, V + 1]
    if len(token_ids):
        counts = counts.at[mx.array(row_ids.astype(np.int32)), mx.array(token_ids.astype(np.int32))].add(1.0)
    return counts[:, :vocab]                                                              # [R, V]


def apply_penalties(
    logits: mx.array,
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    repetition: Sequence[float],
    presence: Sequence[float],
    frequency: Sequence[float],
) -> mx.array:
    """Penalised ``logits`` ``[N, V]``.

    Repetition (HF): tokens seen in prompt + output get positive logits divided
    by the penalty and negative ones multiplied. Then frequency / presence
    (OpenAI): ``logit -= frequency * count + presence * (count > 0)`` over the
    output tokens. Rows without a penalty come back unchanged.
    """
    vocab = logits.shape[1]
    if any(r != 1.0 for r in repetition):
        seen = token_counts([list(p) + list(o) if r != 1.0 else [] for p, o, r in
                             zip(prompt_ids, output_ids, repetition)], vocab) > 0          # [N, V]
        penalty = mx.array(list(repetition), dtype=mx.float32)[:, None]                   # [N, 1]
        penalised = mx.where(logits > 0, logits / penalty, logits * penalty)              # [N, V]
        logits = mx.where(seen, penalised, logits)                                        # [N, V]
    if any(presence) or any(frequency):
        counts = token_counts([o if p or f else [] for o, p, f in zip(output_ids, presence, frequency)],
                              vocab)                                                      # [N, V]
        freq = mx.array(list(frequency), dtype=mx.float32)[:, None]                       # [N, 1]
        pres = mx.array(list(presence), dtype=mx.float32)[:, None]                        # [N, 1]
        logits = logits - (freq * counts + pres * (counts > 0))                           # [N, V]
    return logits


def apply_min_p(logits: mx.array, min_p: Sequence[float]) -> mx.array:
    """Mask tokens whose probability is below ``min_p`` times the row's best (tested in log space)."""
    with np.errstate(divide="ignore"):
        floor = mx.array(np.log(np.asarray(min_p, dtype=np.float64)).astype(np.float32))  # [R]
    threshold = mx.max(logits, axis=-1, keepdims=True) + floor[:, None]                   # [R, 1]
    return mx.where(logits < threshold, -mx.inf, logits)                                  # [R, V]


def apply_top_k_top_p(logits: mx.array, top_k: Sequence[int], top_p: Sequence[float]) -> mx.array:
    """Mask everything outside each row's top-k, then outside its top-p nucleus.

    The nucleus is the smallest set of best tokens whose renormalised mass
    (after top-k) reaches ``top_p``; it is searched among the best
    ``TOP_P_CANDIDATES`` tokens first, then 16 times as many while some row's
    nucleus is larger, up to the whole vocabulary. Tokens tied with the last
    kept one are kept too.
    """
    vocab = logits.shape[1]
    k = mx.array([t if 0 < t < vocab else vocab for t in top_k])                          # [R]
    p = mx.array([q if q < 1.0 else float("inf") for q in top_p], dtype=mx.float32)       # [R]
    if all(q >= 1.0 for q in top_p):
        num_candidates = max(t if 0 < t < vocab else vocab for t in top_k)
    elif all(t > 0 for t in top_k):
        num_candidates = min(vocab, max(top_k))
    else:
        num_candidates = min(vocab, max(TOP_P_CANDIDATES, max(top_k)))
    full_total = mx.logsumexp(logits, axis=-1) if any(0 < q < 1.0 for q in top_p) else None  # [R]
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
        incomplete = ~inside & (mass[:, -1] < p)                                          # [R]
        if num_candidates == vocab or not mx.any(incomplete).item():
            break
        num_candidates = min(vocab, num_candidates * 16)
    last = mx.sum(keep, axis=-1, keepdims=True) - 1                                       # [R, 1]
    threshold = mx.take_along_axis(values, last, axis=1)                                  # [R, 1]
    return mx.where(logits < threshold, -mx.inf, logits)                                  # [R, V]
