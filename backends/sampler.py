"""Batched, device-agnostic token sampling in torch (modelled on vLLM's sampler).

Order of operations on the logits ``[N, V]`` of the N requests that sample:

1. logprobs (where asked) from ``log_softmax`` of the RAW model logits;
2. repetition penalty (HF: over prompt + output), then frequency and presence
   penalties (OpenAI: over output tokens only);
3. ``min_tokens``: EOS and ``stop_token_ids`` masked while the output is shorter;
4. greedy rows (temperature ~0 or top_k == 1): argmax, lowest id on ties;
5. random rows: temperature → min_p → top_k → top_p → inverse-CDF draw: one
   uniform per row from the request's own generator (seeded requests) or the
   sampler's, looked up in the row's float64 cumulative distribution (exact
   like ``torch.multinomial``, without drawing a random number per token).

A seeded request gets a ``torch.Generator`` seeded with its seed at its first
random sample, kept until ``drop``: it draws exactly one number per sampled
token, so its tokens do not depend on which other requests share the batch.
A generator re-created after a drop (preemption) first skips one draw per
token already generated, so a preempted request continues its stream.
Greedy batches without penalties take a fast path: one argmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import torch

from scheduler.output import Logprobs

# Temperatures below this are treated as greedy (dividing by them overflows).
GREEDY_TEMPERATURE = 1e-5
# top_p looks for its nucleus among this many best tokens first, then 16x more,
# up to the whole vocabulary.
TOP_P_CANDIDATES = 64


class SamplingRow(Protocol):
    """What the sampler reads of one request (``ScheduledRequest`` fits)."""

    request_id: str
    sampling_params: object           # engine.SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class SamplerOutput:
    """Sampled token and optional logprobs per row, in row order."""

    token_ids: list[int]
    logprobs: list[Logprobs | None]


class Sampler:
    """Samples one token per row; owns the per-request seeded generators."""

    def __init__(self, eos_token_ids: Iterable[int] = (), seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(int(seed))
        self._seeded: dict[str, torch.Generator] = {}

    def drop(self, request_ids: Iterable[str]) -> None:
        """Forget the per-request state (seeded generators) of ``request_ids``."""
        for request_id in request_ids:
            self._seeded.pop(request_id, None)

    def clear(self) -> None:
        """Forget every request's state."""
        self._seeded.clear()

    @property
    def num_seeded_generators(self) -> int:
        return len(self._seeded)

    def sample_rows(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> tuple[list[int], list[Logprobs | None]]:
        """``sample`` in inference mode, as ``(token_ids, logprobs)`` (what ``backends.base.run_step`` takes)."""
        with torch.inference_mode():
            sampled = self.sample(logits, rows)
        return sampled.token_ids, sampled.logprobs

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """Sample one token for each of ``rows`` from ``logits`` ``[N, V]`` (float32)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [N, V] with N = {len(rows)} rows, got {tuple(logits.shape)}")
        params = [r.sampling_params for r in rows]
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = None
        if logprob_rows:
            raw_logprobs = torch.log_softmax(logits[logprob_rows].float(), dim=-1)       # [M, V]

        greedy = [p.temperature < GREEDY_TEMPERATURE or p.top_k == 1 for p in params]
        logits = self._apply_constraints(logits, rows, params)                           # [N, V]
        if all(greedy):
            token_ids = logits.argmax(dim=-1).tolist()
        else:
            token_ids = self._sample_mixed(logits, rows, params, greedy)
        logprobs: list[Logprobs | None] = [None] * len(rows)
        if raw_logprobs is not None:
            for row, lp in zip(logprob_rows, _gather_logprobs(raw_logprobs, [token_ids[i] for i in logprob_rows],
                                                                [params[i].logprobs for i in logprob_rows])):
                logprobs[row] = lp
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    def _apply_constraints(self, logits: torch.Tensor, rows: Sequence[SamplingRow], params: list) -> torch.Tensor:
        """Penalties and min_tokens masking; returns ``logits`` itself when neither applies."""
        if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
            logits = apply_penalties(
                logits,
                [r.prompt_token_ids for r in rows],
                [r.output_token_ids for r in rows],
                [p.repetition_penalty for p in params],
                [p.presence_penalty for p in params],
                [p.frequency_penalty for p in params],
            )                                                                            # [N, V]
        masked_rows, masked_ids = [], []
        for i, (r, p) in enumerate(zip(rows, params)):
            if len(r.output_token_ids) < p.min_tokens:
                stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
                stop_ids = [t for t in stop_ids if t < logits.shape[1]]
                masked_rows += [i] * len(stop_ids)
                masked_ids += stop_ids
        if masked_rows:
            logits = logits.clone()
            logits[masked_rows, masked_ids] = float("-inf")                              # [N, V]
        return logits

    def _sample_mixed(self, logits: torch.Tensor, rows: Sequence[SamplingRow], params: list,
                      greedy: list[bool]) -> list[int]:
        device = logits.device
        token_ids = [0] * len(rows)
        greedy_rows = [i for i, g in enumerate(greedy) if g]
        if greedy_rows:
            picked = logits[greedy_rows].argmax(dim=-1).tolist()
            for i, token in zip(greedy_rows, picked):
                token_ids[i] = token
        random_rows = [i for i, g in enumerate(greedy) if not g]
        sub = [params[i] for i in random_rows]
        temperature = torch.tensor([p.temperature for p in sub], device=device)         # [R]
        scaled = logits[random_rows] / temperature[:, None]                              # [R, V]
        if any(p.min_p > 0 for p in sub):
            scaled = apply_min_p(scaled, [p.min_p for p in sub])                         # [R, V]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in sub):
            scaled = apply_top_k_top_p(scaled, [p.top_k for p in sub], [p.top_p for p in sub])  # [R, V]
        cdf = torch.softmax(scaled.double(), dim=-1).cumsum_(dim=-1)                     # [R, V]

        uniform = torch.empty(len(sub), 1, dtype=torch.float64, device=device)          # [R, 1]
        unseeded = [j for j, p in enumerate(sub) if p.seed is None]
        if unseeded:
            uniform[unseeded] = torch.rand(len(unseeded), 1, dtype=torch.float64, device=device,
                                           generator=self._generator)
        for j, p in enumerate(sub):
            if p.seed is not None:
                row = rows[random_rows[j]]
                generator = self._seeded_generator(row.request_id, p.seed, len(row.output_token_ids))
                uniform[j] = torch.rand(1, dtype=torch.float64, device=device, generator=generator)
        picked = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)              # [R, 1]
        for i, token in zip(random_rows, picked.clamp_(max=logits.shape[1] - 1)[:, 0].tolist()):
            token_ids[i] = token
        return token_ids

    def _seeded_generator(self, request_id: str, seed: int, num_drawn: int) -> torch.Generator:
        """The request's generator; a new one skips the ``num_drawn`` draws made before."""
        generator = self._seeded.get(request_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(seed))
            if num_drawn:
                torch.rand(num_drawn, dtype=torch.float64, device=self.device, generator=generator)
            self._seeded[request_id] = generator
        return generator


def _gather_logprobs(logprobs: torch.Tensor, token_ids: list[int], num_top: list[int]) -> list[Logprobs]:
    """Logprob, rank and top-k of each row's sampled token from ``logprobs`` ``[M, V]``."""
    sampled = torch.as_tensor(token_ids, device=logprobs.device)[:, None]                # [M, 1]
    sampled_lp = logprobs.gather(1, sampled)                                             # [M, 1]
    ranks = (logprobs > sampled_lp).sum(dim=-1) + 1                                      # [M]
    k = max(num_top)
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], sampled[:, :0])  # [M, k]
    result = []
    for i, (lp, rank, tops, ids) in enumerate(zip(sampled_lp[:, 0].tolist(), ranks.tolist(),
                                                   top_lp.tolist(), top_ids.tolist())):
        top = list(zip(ids[: num_top[i]], tops[: num_top[i]]))
        result.append(Logprobs(token_id=token_ids[i], logprob=lp, rank=rank, top=top))
    return result


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    repetition: Sequence[float],
    presence: Sequence[float],
    frequency: Sequence[float],
) -> torch.Tensor:
    """Penalised copy of ``logits`` ``[N, V]``.

    Repetition (HF): tokens seen in prompt + output get positive logits divided
    by the penalty and negative ones multiplied. Then frequency / presence
    (OpenAI): ``logit -= frequency * count + presence * (count > 0)`` over the
    output tokens.
    """
    vocab = logits.shape[1]
    logits = logits.clone()                                                              # [N, V]
    rep_rows = [i for i, r in enumerate(repetition) if r != 1.0]
    if rep_rows:
        seen = _token_counts([list(prompt_ids[i]) + list(output_ids[i]) for i in rep_rows], vocab,
                             logits.device) > 0                                          # [R, V]
        penalty = torch.tensor([repetition[i] for i in rep_rows], device=logits.device)[:, None]  # [R, 1]
        sub = logits[rep_rows]                                                           # [R, V]
        penalised = torch.where(sub > 0, sub / penalty, sub * penalty)                   # [R, V]
        logits[rep_rows] = torch.where(seen, penalised, sub)                             # [R, V]
    out_rows = [i for i in range(len(presence)) if presence[i] or frequency[i]]
    if out_rows:
        counts = _token_counts([output_ids[i] for i in out_rows], vocab, logits.device)  # [R, V]
        freq = torch.tensor([frequency[i] for i in out_rows], device=logits.device)[:, None]  # [R, 1]
        pres = torch.tensor([presence[i] for i in out_rows], device=logits.device)[:, None]   # [R, 1]
        logits[out_rows] -= freq * counts + pres * (counts > 0)                          # [R, V]
    return logits


def _token_counts(seqs: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token id occurs in each sequence: ``[len(seqs), vocab]`` float32."""
    width = max(1, max(len(s) for s in seqs))
    padded = [list(s) + [vocab] * (width - len(s)) for s in seqs]
    ids = torch.tensor(padded, dtype=torch.int64, device=device).clamp_(0, vocab)       # [R, W]
    counts = torch.zeros(len(seqs), vocab + 1, device=device)                           # [R, V + 1]
    counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))
    return counts[:, :vocab]                                                             # [R, V]


def apply_min_p(logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """Mask tokens whose probability is below ``min_p`` times the row's best.

    ``p_i < min_p * p_max`` is tested in log space, ``l_i < l_max + log(min_p)``:
    no softmax needed.
    """
    floor = torch.tensor(min_p, dtype=torch.float64).log().to(logits.dtype)              # [R]
    threshold = logits.amax(dim=-1, keepdim=True) + floor[:, None].to(logits.device)     # [R, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))                         # [R, V]


def apply_top_k_top_p(logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> torch.Tensor:
    """Mask everything outside each row's top-k, then outside its top-p nucleus.

    The nucleus is the smallest set of best tokens whose renormalised mass
    (after top-k) reaches ``top_p``. It is searched among the best
    ``TOP_P_CANDIDATES`` tokens first, then 16 times as many while some row's
    nucleus is larger, up to a full sort. Tokens tied with the last kept one
    are kept too.
    """
    num_rows, vocab = logits.shape
    device = logits.device
    k = torch.tensor([t if 0 < t < vocab else vocab for t in top_k], device=device)       # [R]
    p = torch.tensor([q if q < 1.0 else float("inf") for q in top_p], device=device)   # [R]
    if all(q >= 1.0 for q in top_p):
        num_candidates = int(k.max())
    elif all(t > 0 for t in top_k):
        num_candidates = min(vocab, max(top_k))
    else:
        num_candidates = min(vocab, max(TOP_P_CANDIDATES, max(top_k)))
    full_total = logits.logsumexp(-1) if any(0 < q < 1.0 for q in top_p) else None        # [R]
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
        if num_candidates == vocab or not bool(incomplete.any()):
            break
        num_candidates = min(vocab, num_candidates * 16)
    last = keep.sum(dim=-1, keepdim=True) - 1                                            # [R, 1]
    threshold = values.gather(1, last)                                                   # [R, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))                         # [R, V]
