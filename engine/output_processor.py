"""Turns sampled tokens into text, stop decisions and ``RequestOutput`` deltas.

One ``RequestState`` per user request; an ``n > 1`` request has ``n``
``CompletionState`` children, each its own sequence in the scheduler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.sampling_params import SamplingParams
from scheduler.output import Logprobs


@dataclass
class CompletionState:
    index: int
    seq_id: str                                  # the scheduler's id of this sequence
    params: SamplingParams
    detok: IncrementalDetokenizer
    logprobs: list[Logprobs] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_emitted_tokens: int = 0                  # token ids already streamed
    token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[CompletionState]
    metrics: RequestMetrics
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)


@dataclass
class StopChecker:
    """The stop rules that do not depend on text (EOS, stop ids, lengths)."""

    eos_token_ids: frozenset[int]
    max_tokens_per_request: int                  # prompt + output, from the context and the cache

    def check(self, c: CompletionState, token_id: int) -> tuple[str, str | int | None] | None:
        p = c.params
        if len(c.token_ids) > p.min_tokens:         # the new token is already appended
            if not p.ignore_eos and token_id in self.eos_token_ids:
                return "stop", None
            if token_id in p.stop_token_ids:
                return "stop", token_id
        return None

    def check_length(self, c: CompletionState, num_prompt_tokens: int) -> bool:
        num_out = len(c.token_ids)
        if c.params.max_tokens is not None and num_out >= c.params.max_tokens:
            return True
        return num_prompt_tokens + num_out >= self.max_tokens_per_request


@dataclass
class OutputProcessor:
    stop_checker: StopChecker
    states: dict[str, RequestState] = field(default_factory=dict)       # request id -> state
    by_seq: dict[str, tuple[RequestState, CompletionState]] = field(default_factory=dict)

    def add(self, state: RequestState) -> None:
        self.states[state.request_id] = state
        for c in state.completions:
            self.by_seq[c.seq_id] = (state, c)

    def process_token(self, seq_id: str, token_id: int, logprobs: Logprobs | None, now: float) -> RequestState:
        """Record one sampled token; sets finish_reason when the completion ends."""
        state, c = self.by_seq[seq_id]
        if state.metrics.first_token_time is None:
            state.metrics.first_token_time = now
        state.metrics.num_generation_tokens += 1
        if c.logprobs is not None and logprobs is not None:
            c.logprobs.append(logprobs)
        c.token_ids.append(token_id)
        stop = self.stop_checker.check(c, token_id)
        if stop is not None:                         # EOS / stop id: kept in ids, not in text
            c.finish_reason, c.stop_reason = stop
        else:
            check_stop_str = len(c.token_ids) >= c.params.min_tokens
            matched = c.detok.add_token(token_id, check_stop=check_stop_str)
            if matched is not None:
                c.finish_reason, c.stop_reason = "stop", matched
            elif self.stop_checker.check_length(c, len(state.prompt_token_ids)):
                c.finish_reason = "length"
        if c.finish_reason is not None:
            c.detok.finish()
        return state

    def abort(self, state: RequestState, reason: str = "abort") -> None:
        for c in state.completions:
            if c.finish_reason is None:
                c.finish_reason = reason
                c.detok.finish()

    def make_delta(self, state: RequestState, now: float | None = None) -> RequestOutput:
        """The output holding what each completion gained since the last delta."""
        outs = []
        for c in state.completions:
            finished = c.finish_reason is not None
            text = c.detok.take_delta(finished)
            new_ids = c.token_ids[c.num_emitted_tokens:]
            new_lps = None if c.logprobs is None else c.logprobs[c.num_emitted_tokens:]
            c.num_emitted_tokens = len(c.token_ids)
            if text or new_ids or finished:
                outs.append(CompletionOutput(c.index, text, list(new_ids), c.finish_reason, c.stop_reason, new_lps))
        finished = state.finished
        if finished and state.metrics.finished_time is None:
            state.metrics.finished_time = now or time.time()
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outs, finished,
                             state.num_cached_tokens, state.metrics)

    def remove(self, state: RequestState) -> None:
        self.states.pop(state.request_id, None)
        for c in state.completions:
            self.by_seq.pop(c.seq_id, None)
