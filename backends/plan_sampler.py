"""The part of a sampler every array framework shares: running a ``SamplingPlan`` in order.

``PlanSampler.run`` builds the step's ``SamplingPlan`` and executes its stages
in the order ``backends/sampler.py`` documents (logprobs of the raw logits,
penalties, the token mask (logit_bias, grammar bitmask, banned tokens),
argmax of the greedy rows, temperature → min_p → top_k / top_p → one
uniform per drawing row), and keeps the per-request
seeded streams: created at a request's first draw (skipping the draws of the
tokens it generated before, so a preempted request continues its stream),
advanced once per drawn token, forgotten at ``drop``.

A framework subclasses it with its array operations (the abstract methods):
torch in ``backends/sampler.py``, MLX in ``backends/metal/sampler.py``. A
stream is whatever the framework draws from (a ``torch.Generator``, an MLX
key).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Generic, Iterable, Sequence, TypeVar

import numpy as np

from backends.sampling_plan import DrawPlan, PenaltyPlan, SamplingPlan, SamplingRow, TokenMask, TopKTopP
from scheduler.output import Logprobs

ArrayT = TypeVar("ArrayT")            # the framework's array (torch.Tensor, mx.array)
StreamT = TypeVar("StreamT")          # one seeded request's random state


class PlanSampler(ABC, Generic[ArrayT, StreamT]):
    """Samples one token per row by executing the step's plan; owns the per-request seeded streams."""

    def __init__(self, eos_token_ids: Iterable[int] = ()) -> None:
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self._seeded: dict[str, StreamT] = {}

    def drop(self, request_ids: Iterable[str]) -> None:
        """Forget the per-request state (seeded streams) of ``request_ids``."""
        for request_id in request_ids:
            self._seeded.pop(request_id, None)

    def clear(self) -> None:
        """Forget every request's state."""
        self._seeded.clear()

    @property
    def num_seeded_generators(self) -> int:
        """Requests whose seeded stream is alive."""
        return len(self._seeded)

    def run(self, logits: ArrayT, rows: Sequence[SamplingRow]) -> tuple[list[int], list[Logprobs | None]]:
        """Token ids and logprobs (None where not asked) of ``rows`` from their ``logits`` ``[N, V]``."""
        return self.execute(logits, self.plan(logits, rows))

    def plan(self, logits: ArrayT, rows: Sequence[SamplingRow]) -> SamplingPlan:
        """The ``SamplingPlan`` of ``rows`` for their ``logits`` ``[N, V]`` (checked to be that shape)."""
        shape = tuple(logits.shape)
        if len(shape) != 2 or shape[0] != len(rows):
            raise ValueError(f"logits must be [N, V] with N = {len(rows)} rows, got {shape}")
        return SamplingPlan.from_rows(rows, self.eos_token_ids, shape[1])

    def execute(self, logits: ArrayT, plan: SamplingPlan) -> tuple[list[int], list[Logprobs | None]]:
        """Run ``plan``'s stages on ``logits`` ``[N, V]``, in order."""
        raw_logprobs = self._log_softmax(logits, plan.logprob_rows) if plan.logprob_rows else None  # [M, V]
        if plan.penalties is not None:
            logits = self._apply_penalties(logits, plan.penalties)                        # [N, V]
        if plan.banned is not None:
            logits = self._apply_token_mask(logits, plan.banned)                          # [N, V]
        if plan.is_all_greedy:
            token_ids = self._argmax(logits, None)
        else:
            token_ids = [0] * plan.num_rows
            if plan.greedy_rows:
                for i, token in zip(plan.greedy_rows, self._argmax(logits, plan.greedy_rows)):
                    token_ids[i] = token
            for i, token in zip(plan.draws.rows, self._draw(logits, plan.draws)):
                token_ids[i] = token
        logprobs: list[Logprobs | None] = [None] * plan.num_rows
        if raw_logprobs is not None:
            picked = [token_ids[i] for i in plan.logprob_rows]
            lps, ranks, top_ids, top_lps = self._logprob_stats(raw_logprobs, picked, max(plan.num_top_logprobs))
            for j, (i, k) in enumerate(zip(plan.logprob_rows, plan.num_top_logprobs)):
                logprobs[i] = Logprobs(token_id=picked[j], logprob=lps[j], rank=ranks[j],
                                       top=list(zip(top_ids[j][:k], top_lps[j][:k])))
        return token_ids, logprobs

    def _draw(self, logits: ArrayT, draws: DrawPlan) -> list[int]:
        """Tokens of the drawing rows: temperature, min_p, top_k / top_p, one uniform each."""
        scaled, uniforms = self._draw_inputs(logits, draws)
        self._settle_streams()
        return self._inverse_cdf(scaled, uniforms)

    def _draw_inputs(self, logits: ArrayT, draws: DrawPlan) -> tuple[ArrayT, list[ArrayT]]:
        """The drawing rows' filtered logits ``[R, V]`` and one uniform ``[1]`` per row (seeded streams advanced)."""
        scaled = self._scale(logits, draws.rows, draws.temperature)                        # [R, V]
        if draws.min_p_log is not None:
            scaled = self._apply_min_p(scaled, draws.min_p_log)                            # [R, V]
        if draws.top_k_top_p is not None:
            scaled = self._apply_top_k_top_p(scaled, draws.top_k_top_p)                   # [R, V]
        uniforms: list[ArrayT | None] = [None] * len(draws.rows)                           # [1] each
        if draws.unseeded:
            shared = self._draw_unseeded(len(draws.unseeded))                              # [U]
            for u, j in enumerate(draws.unseeded):
                uniforms[j] = shared[u:u + 1]
        for draw in draws.seeded:
            stream = self._seeded.get(draw.request_id)
            if stream is None:
                stream = self._new_stream(draw.seed, draw.num_drawn)
            uniforms[draw.position], self._seeded[draw.request_id] = self._draw_seeded(stream)
        return scaled, uniforms

    def _settle_streams(self) -> None:
        """Called after a step's draws (MLX evaluates its keys there); nothing by default."""

    # -- the framework's array operations ---------------------------------------------------------

    @abstractmethod
    def _log_softmax(self, logits: ArrayT, rows: tuple[int, ...]) -> ArrayT:
        """Log-softmax ``[M, V]`` of the raw logits of ``rows``."""

    @abstractmethod
    def _apply_penalties(self, logits: ArrayT, penalties: PenaltyPlan) -> ArrayT:
        """Penalised logits ``[N, V]`` (a new array; the input is left as it is)."""

    @abstractmethod
    def _apply_token_mask(self, logits: ArrayT, mask: TokenMask) -> ArrayT:
        """Logits ``[N, V]`` with ``mask`` applied (a new array): biases added, then grammar bitmasks and banned
        pairs at ``-inf``."""

    @abstractmethod
    def _argmax(self, logits: ArrayT, rows: tuple[int, ...] | None) -> list[int]:
        """Best token of each of ``rows`` (every row when None), lowest id on ties."""

    @abstractmethod
    def _scale(self, logits: ArrayT, rows: tuple[int, ...], temperature: np.ndarray) -> ArrayT:
        """Logits of ``rows`` divided by their temperature (``[R]`` float32): ``[R, V]``."""

    @abstractmethod
    def _apply_min_p(self, logits: ArrayT, min_p_log: np.ndarray) -> ArrayT:
        """``logits`` ``[R, V]`` with tokens below ``max + log(min_p)`` (``[R]`` float32) at ``-inf``."""

    @abstractmethod
    def _apply_top_k_top_p(self, logits: ArrayT, stage: TopKTopP) -> ArrayT:
        """``logits`` ``[R, V]`` with tokens outside each row's top-k, then its top-p nucleus, at ``-inf``."""

    @abstractmethod
    def _draw_unseeded(self, n: int) -> ArrayT:
        """``n`` uniforms in [0, 1) ``[n]`` from the sampler's own stream (advancing it)."""

    @abstractmethod
    def _new_stream(self, seed: int, num_drawn: int) -> StreamT:
        """A request's stream from ``seed``, advanced past ``num_drawn`` draws."""

    @abstractmethod
    def _draw_seeded(self, stream: StreamT) -> tuple[ArrayT, StreamT]:
        """One uniform in [0, 1) ``[1]`` from ``stream``, and the stream to keep for the next draw."""

    @abstractmethod
    def _inverse_cdf(self, logits: ArrayT, uniforms: list[ArrayT]) -> list[int]:
        """Token of each row of ``logits`` ``[R, V]`` where its cumulative mass passes ``u * total``."""

    @abstractmethod
    def _logprob_stats(self, logprobs: ArrayT, token_ids: list[int], num_top: int
                       ) -> tuple[list[float], list[int], list[list[int]], list[list[float]]]:
        """Columns over the rows of ``logprobs`` ``[M, V]``: each token's logprob, its rank, the best ``num_top`` ids
        and their logprobs."""
