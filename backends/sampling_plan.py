"""One step's sampling decisions, made once, in plain Python and numpy.

``SamplingPlan.from_rows`` reads the N rows that sample (their params, prompt
and output tokens) and the EOS ids, and decides everything a sampler does
before it touches an array: which rows report logprobs, which are penalised
and with which token counts, which tokens ``min_tokens`` bans, which rows are
greedy, and for the rows that draw their temperature, min_p, top_k / top_p
and random stream (the sampler's own or the request's seeded one). The torch
and MLX samplers (``backends/sampler.py``, ``backends/metal/sampler.py``)
only execute it with their own array operations, in the order that
``backends/plan_sampler.py`` runs and ``backends/sampler.py`` documents.

Every stage a step does not need is ``None`` (no row penalised, no banned
token, no row drawing, no min_p, no top_k / top_p), so the executors skip it;
an all-greedy step without penalties is one argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

import numpy as np

# Temperatures below this are treated as greedy (dividing by them overflows).
GREEDY_TEMPERATURE = 1e-5
# top_p looks for its nucleus among this many best tokens first, then
# TOP_P_GROWTH times more each try, up to the whole vocabulary.
TOP_P_CANDIDATES = 64
TOP_P_GROWTH = 16


class SamplingRow(Protocol):
    """What the plan reads of one request (``ScheduledRequest`` fits)."""

    request_id: str
    sampling_params: object           # engine.SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # Optional (read with getattr): grammar_bitmask, a [ceil(V/32)] int32 array of allowed tokens, or None.


def _ids(values: Iterable[int]) -> np.ndarray:
    """Token ids (or rows) as an int64 array."""
    return np.asarray(list(values), dtype=np.int64)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """The parts end to end; an empty int64 array when there are none."""
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class PenaltyPlan:
    """Step 2: the rows with a penalty, their values, and their token counts as sparse pairs.

    Repetition (HF) uses the tokens seen in prompt + output, frequency and
    presence (OpenAI) the occurrences in the output; a pair names a position
    in ``rows`` and a token id below the vocabulary size, each pair once.
    """

    rows: tuple[int, ...]             # P rows (of the step) with any penalty, ascending
    repetition: np.ndarray            # [P] float32; 1 where the row has none
    frequency: np.ndarray             # [P] float32; 0 where none
    presence: np.ndarray              # [P] float32; 0 where none
    seen_rows: np.ndarray             # [S] int64 position in rows of each (row, token) seen in prompt + output
    seen_token_ids: np.ndarray        # [S] int64 its token id (rows with a repetition penalty only)
    count_rows: np.ndarray            # [C] int64 position in rows of each (row, token) in the output
    count_token_ids: np.ndarray       # [C] int64 its token id (rows with frequency or presence only)
    counts: np.ndarray                # [C] float32 how often the token occurs in the row's output

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("a PenaltyPlan needs at least one row (use None for no penalties)")
        for name in ("repetition", "frequency", "presence"):
            if getattr(self, name).shape != (len(self.rows),):
                raise ValueError(f"{name} must have one value per row, got shape {getattr(self, name).shape}")
        if self.seen_rows.shape != self.seen_token_ids.shape:
            raise ValueError("seen_rows and seen_token_ids must pair up")
        if not self.count_rows.shape == self.count_token_ids.shape == self.counts.shape:
            raise ValueError("count_rows, count_token_ids and counts must pair up")

    @property
    def needs_repetition(self) -> bool:
        """Some row has a repetition penalty other than 1."""
        return bool((self.repetition != 1.0).any())

    @property
    def needs_output_penalties(self) -> bool:
        """Some row has a frequency or presence penalty."""
        return bool(self.frequency.any() or self.presence.any())


def plan_penalties(prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]],
                   repetition: Sequence[float], presence: Sequence[float], frequency: Sequence[float],
                   vocab_size: int) -> PenaltyPlan | None:
    """The ``PenaltyPlan`` of rows with these penalties; ``None`` when no row has one."""
    rows = tuple(i for i in range(len(repetition)) if repetition[i] != 1.0 or presence[i] or frequency[i])
    if not rows:
        return None
    seen_rows, seen_ids, count_rows, count_ids, counts = [], [], [], [], []
    for j, i in enumerate(rows):
        if repetition[i] != 1.0:
            seen = np.unique(_ids([*prompt_ids[i], *output_ids[i]]))
            seen = seen[(seen >= 0) & (seen < vocab_size)]
            seen_rows.append(np.full(len(seen), j, dtype=np.int64))
            seen_ids.append(seen)
        if presence[i] or frequency[i]:
            ids, num = np.unique(_ids(output_ids[i]), return_counts=True)
            inside = (ids >= 0) & (ids < vocab_size)
            count_rows.append(np.full(int(inside.sum()), j, dtype=np.int64))
            count_ids.append(ids[inside])
            counts.append(num[inside])
    return PenaltyPlan(
        rows=rows,
        repetition=np.asarray([repetition[i] for i in rows], dtype=np.float32),
        frequency=np.asarray([frequency[i] for i in rows], dtype=np.float32),
        presence=np.asarray([presence[i] for i in rows], dtype=np.float32),
        seen_rows=_concat(seen_rows), seen_token_ids=_concat(seen_ids),
        count_rows=_concat(count_rows), count_token_ids=_concat(count_ids),
        counts=_concat(counts).astype(np.float32),
    )


_NO_IDS = np.zeros(0, dtype=np.int64)
# Row b of this table: the additive mask (0 allowed, -inf banned) of the 8 tokens whose bits are byte b.
_BYTE_MASKS = np.where((np.arange(256)[:, None] >> np.arange(8)) & 1, np.float32(0), np.float32(-np.inf)
                       ).astype(np.float32)                                        # [256, 8]


def bitmask_to_additive(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """The ``[G, V]`` float32 mask (0 allowed, ``-inf`` banned) of a packed ``[G, W]`` int32 bitmask.

    Bit ``t % 32`` of word ``t // 32`` allows token ``t``; tokens past ``32 W``
    are banned. Adding this to the logits is the cheapest way to apply it
    (a byte-table lookup and an add: ~5 ms at 32 x 49152 on one CPU core,
    where a boolean ``where`` / ``masked_fill`` took ~20 ms).
    """
    as_bytes = np.ascontiguousarray(bitmask, dtype=np.int32).view(np.uint8)            # [G, 4W] little-endian
    additive = np.take(_BYTE_MASKS, as_bytes, axis=0).reshape(len(bitmask), -1)         # [G, 32W]
    if additive.shape[1] < vocab_size:
        pad = np.full((len(bitmask), vocab_size - additive.shape[1]), -np.inf, dtype=np.float32)
        additive = np.concatenate([additive, pad], axis=1)                              # [G, V]
    return additive[:, :vocab_size]                                                     # [G, V]


@dataclass(frozen=True, eq=False)
class TokenMask:
    """Step 3: the per-row constraints on the penalised logits, applied in this order.

    1. ``logit_bias``: (row, token id, value) triples added to the logits;
    2. structured output: each of ``bitmask_rows`` keeps only the tokens whose
       bit is set in its row of ``bitmask`` (bit ``t % 32`` of word ``t // 32``;
       tokens past the mask's width are banned), the rest go to ``-inf``;
    3. banned (row, token id) pairs set to ``-inf`` (``min_tokens``: EOS and
       stop ids while the output is short).
    """

    rows: np.ndarray                  # [M] int64 row of each banned pair
    token_ids: np.ndarray             # [M] int64 its token id, below the vocabulary size
    bias_rows: np.ndarray = field(default_factory=lambda: _NO_IDS)       # [B] int64 row of each logit_bias triple
    bias_token_ids: np.ndarray = field(default_factory=lambda: _NO_IDS)  # [B] int64 its token id, below V
    bias_values: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))  # [B] float32 added
    bitmask_rows: tuple[int, ...] = ()  # G rows constrained by a grammar, ascending
    bitmask: np.ndarray | None = None   # [G, W] int32 allowed-token bits of bitmask_rows; None when G = 0

    def __post_init__(self) -> None:
        if self.rows.shape != self.token_ids.shape:
            raise ValueError("rows and token_ids must pair up")
        if not self.bias_rows.shape == self.bias_token_ids.shape == self.bias_values.shape:
            raise ValueError("bias_rows, bias_token_ids and bias_values must pair up")
        if (self.bitmask is None) != (not self.bitmask_rows) or (
                self.bitmask is not None and (self.bitmask.ndim != 2 or len(self.bitmask) != len(self.bitmask_rows))):
            raise ValueError("bitmask must be [G, W] with one row per bitmask_rows entry (None when there are none)")
        if not (len(self.rows) or len(self.bias_rows) or self.bitmask_rows):
            raise ValueError("a TokenMask needs a banned pair, a bias or a bitmask row (use None for no mask)")


@dataclass(frozen=True, eq=False)
class TopKTopP:
    """The top_k / top_p stage of the drawing rows, with its candidate search decided.

    The nucleus is searched among the best ``num_candidates`` tokens first,
    then ``next_num_candidates`` as many while some row's nucleus is larger.
    """

    k: np.ndarray                     # [R] int64 tokens kept by top_k; vocab_size where off
    p: np.ndarray                     # [R] float32 nucleus mass; inf where off
    num_candidates: int               # tokens the first try looks at, in [1, vocab_size]
    needs_full_total: bool            # some row has 0 < top_p < 1: its mass needs the full logsumexp
    vocab_size: int                   # V

    def __post_init__(self) -> None:
        if self.k.shape != self.p.shape:
            raise ValueError("k and p must have one value per row")
        if not 1 <= self.num_candidates <= self.vocab_size:
            raise ValueError(f"num_candidates must be in [1, {self.vocab_size}], got {self.num_candidates}")

    def next_num_candidates(self, num_candidates: int) -> int:
        """Candidates of the next, wider try (capped at the whole vocabulary)."""
        return min(self.vocab_size, num_candidates * TOP_P_GROWTH)


def plan_top_k_top_p(top_k: Sequence[int], top_p: Sequence[float], vocab_size: int) -> TopKTopP | None:
    """The ``TopKTopP`` stage of rows with these settings; ``None`` when no row uses either."""
    if not any(t > 0 or q < 1.0 for t, q in zip(top_k, top_p)):
        return None
    k = [t if 0 < t < vocab_size else vocab_size for t in top_k]
    if all(q >= 1.0 for q in top_p):
        num_candidates = max(k)
    elif all(t > 0 for t in top_k):
        num_candidates = min(vocab_size, max(top_k))
    else:
        num_candidates = min(vocab_size, max(TOP_P_CANDIDATES, max(top_k)))
    return TopKTopP(k=np.asarray(k, dtype=np.int64),
                    p=np.asarray([q if q < 1.0 else np.inf for q in top_p], dtype=np.float32),
                    num_candidates=num_candidates, needs_full_total=any(0.0 < q < 1.0 for q in top_p),
                    vocab_size=vocab_size)


def plan_min_p(min_p: Sequence[float]) -> np.ndarray | None:
    """``log(min_p)`` ``[R]`` float32 (``-inf`` where off), the floor below the best logit; ``None`` if unused."""
    if not any(m > 0 for m in min_p):
        return None
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(min_p, dtype=np.float64)).astype(np.float32)


@dataclass(frozen=True)
class SeededDraw:
    """One draw from a seeded request's own random stream."""

    position: int                     # position of the row in DrawPlan.rows
    request_id: str                   # whose stream
    seed: int                         # the stream's seed (used when it is created)
    num_drawn: int                    # tokens generated before: a new stream skips that many draws

    def __post_init__(self) -> None:
        if self.position < 0 or self.num_drawn < 0:
            raise ValueError(f"position and num_drawn must be >= 0, got {self.position}, {self.num_drawn}")


@dataclass(frozen=True, eq=False)
class DrawPlan:
    """Step 5: the rows that draw: temperature, then min_p, top_k / top_p, then one uniform each."""

    rows: tuple[int, ...]             # R rows (of the step) that draw, ascending
    temperature: np.ndarray           # [R] float32, each >= GREEDY_TEMPERATURE
    min_p_log: np.ndarray | None      # [R] float32 log(min_p), -inf where off; None: no row uses min_p
    top_k_top_p: TopKTopP | None      # None: no row uses top_k or top_p
    unseeded: tuple[int, ...]         # positions in rows drawing from the sampler's own stream, ascending
    seeded: tuple[SeededDraw, ...]    # the other positions, one draw each from the request's stream

    def __post_init__(self) -> None:
        if not self.rows or self.temperature.shape != (len(self.rows),):
            raise ValueError("a DrawPlan needs rows and one temperature per row")
        if sorted([*self.unseeded, *(s.position for s in self.seeded)]) != list(range(len(self.rows))):
            raise ValueError("unseeded and seeded must split the positions of rows")


def plan_draws(rows: Sequence[SamplingRow], draw_rows: Sequence[int], vocab_size: int) -> DrawPlan | None:
    """The ``DrawPlan`` of ``draw_rows`` (indices into ``rows``); ``None`` when there are none."""
    if not draw_rows:
        return None
    params = [rows[i].sampling_params for i in draw_rows]
    seeded = tuple(SeededDraw(j, rows[i].request_id, int(p.seed), len(rows[i].output_token_ids))
                   for j, (i, p) in enumerate(zip(draw_rows, params)) if p.seed is not None)
    return DrawPlan(
        rows=tuple(draw_rows),
        temperature=np.asarray([p.temperature for p in params], dtype=np.float32),
        min_p_log=plan_min_p([p.min_p for p in params]),
        top_k_top_p=plan_top_k_top_p([p.top_k for p in params], [p.top_p for p in params], vocab_size),
        unseeded=tuple(j for j, p in enumerate(params) if p.seed is None),
        seeded=seeded,
    )


def plan_min_tokens(rows: Sequence[SamplingRow], eos_token_ids: Sequence[int], vocab_size: int) -> TokenMask | None:
    """EOS (unless ``ignore_eos``) and ``stop_token_ids`` of rows whose output is shorter than ``min_tokens``."""
    masked_rows, masked_ids = [], []
    for i, r in enumerate(rows):
        p = r.sampling_params
        if len(r.output_token_ids) < p.min_tokens:
            stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            stop_ids = sorted(t for t in stop_ids if t < vocab_size)
            masked_rows += [i] * len(stop_ids)
            masked_ids += stop_ids
    return TokenMask(_ids(masked_rows), _ids(masked_ids)) if masked_rows else None


def plan_token_mask(rows: Sequence[SamplingRow], eos_token_ids: Sequence[int], vocab_size: int) -> TokenMask | None:
    """The step's ``TokenMask``: logit_bias, grammar bitmasks and ``min_tokens`` bans; ``None`` when no row has any."""
    banned = plan_min_tokens(rows, eos_token_ids, vocab_size)
    bias_rows, bias_ids, bias_values, bitmask_rows, bitmasks = [], [], [], [], []
    for i, r in enumerate(rows):
        bias = getattr(r.sampling_params, "logit_bias", None)
        if bias:
            kept = sorted(t for t in bias if 0 <= t < vocab_size)
            bias_rows += [i] * len(kept)
            bias_ids += kept
            bias_values += [bias[t] for t in kept]
        bitmask = getattr(r, "grammar_bitmask", None)
        if bitmask is not None:
            bitmask_rows.append(i)
            bitmasks.append(np.asarray(bitmask, dtype=np.int32))
    if banned is None and not bias_rows and not bitmask_rows:
        return None
    return TokenMask(
        rows=banned.rows if banned is not None else _NO_IDS,
        token_ids=banned.token_ids if banned is not None else _NO_IDS,
        bias_rows=_ids(bias_rows), bias_token_ids=_ids(bias_ids),
        bias_values=np.asarray(bias_values, dtype=np.float32),
        bitmask_rows=tuple(bitmask_rows), bitmask=np.stack(bitmasks) if bitmasks else None,
    )


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """Everything one step's sampling decides before it touches an array, stage by stage."""

    num_rows: int                     # N rows that sample, in the logits' row order
    vocab_size: int                   # V, the width of the logits
    logprob_rows: tuple[int, ...]     # step 1: rows that report logprobs, ascending
    num_top_logprobs: tuple[int, ...]  # top alternatives each of logprob_rows asks for
    penalties: PenaltyPlan | None     # step 2; None: no row is penalised
    banned: TokenMask | None          # step 3 (logit_bias, grammar bitmasks, min_tokens); None: nothing
    greedy_rows: tuple[int, ...]      # step 4: rows that take the argmax, ascending
    draws: DrawPlan | None            # step 5; None: every row is greedy

    def __post_init__(self) -> None:
        if len(self.logprob_rows) != len(self.num_top_logprobs):
            raise ValueError("num_top_logprobs needs one count per logprob row")
        drawn = self.draws.rows if self.draws is not None else ()
        if sorted([*self.greedy_rows, *drawn]) != list(range(self.num_rows)):
            raise ValueError("greedy_rows and draws.rows must split the rows")

    @classmethod
    def from_rows(cls, rows: Sequence[SamplingRow], eos_token_ids: Sequence[int], vocab_size: int) -> SamplingPlan:
        """The plan of one step: ``rows`` in the logits' order, the model's EOS ids, the logits' width."""
        params = [r.sampling_params for r in rows]
        logprob_rows = tuple(i for i, p in enumerate(params) if p.logprobs is not None)
        greedy = [p.temperature < GREEDY_TEMPERATURE or p.top_k == 1 for p in params]
        return cls(
            num_rows=len(rows),
            vocab_size=vocab_size,
            logprob_rows=logprob_rows,
            num_top_logprobs=tuple(params[i].logprobs for i in logprob_rows),
            penalties=plan_penalties([r.prompt_token_ids for r in rows], [r.output_token_ids for r in rows],
                                     [p.repetition_penalty for p in params], [p.presence_penalty for p in params],
                                     [p.frequency_penalty for p in params], vocab_size),
            banned=plan_token_mask(rows, eos_token_ids, vocab_size),
            greedy_rows=tuple(i for i, g in enumerate(greedy) if g),
            draws=plan_draws(rows, [i for i, g in enumerate(greedy) if not g], vocab_size),
        )

    @property
    def is_all_greedy(self) -> bool:
        """No row draws: the (penalised, masked) logits need one argmax."""
        return self.draws is None

    @property
    def is_plain_argmax(self) -> bool:
        """All greedy, no penalty, no banned token, no logprobs: the raw logits' argmax is the answer."""
        return self.is_all_greedy and self.penalties is None and self.banned is None and not self.logprob_rows
