"""Turns sampled tokens into text, stop-string matches and ``RequestOutput`` deltas.

One ``RequestState`` per user request; an ``n > 1`` request has ``n``
``CompletionState`` children, each its own sequence in the scheduler. The
token-level stops (EOS, stop ids, lengths) are the scheduler's
(``scheduler.stop``); this module is told of them and only finds stop
strings, the one stop that needs text.
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
    prompt_logprobs: list[Logprobs | None] | None = None   # one per prompt position so far (first: None); None: not asked
    prompt_logprobs_sent: bool = False           # the complete list went out in a delta

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)


@dataclass
class OutputProcessor:
    states: dict[str, RequestState] = field(default_factory=dict)       # request id -> state
    by_seq: dict[str, tuple[RequestState, CompletionState]] = field(default_factory=dict)

    def add(self, state: RequestState) -> None:
        self.states[state.request_id] = state
        for c in state.completions:
            self.by_seq[c.seq_id] = (state, c)

    def process_token(self, seq_id: str, token_id: int, logprobs: Logprobs | None, now: float,
                      finish_reason: str | None = None, stop_token_id: int | None = None) -> RequestState:
        """Record one sampled token; sets finish_reason when the completion ends.

        ``finish_reason`` is the scheduler's verdict on this token: "stop"
        (EOS, or the stop id ``stop_token_id``), "length", or None. A stop
        string matched on the same token wins over "length"."""
        state, c = self.by_seq[seq_id]
        if state.metrics.first_token_time is None:
            state.metrics.first_token_time = now
        state.metrics.num_generation_tokens += 1
        if c.logprobs is not None and logprobs is not None:
            c.logprobs.append(logprobs)
        c.token_ids.append(token_id)
        if finish_reason == "stop":                  # EOS / stop id: kept in ids, not in text
            c.finish_reason, c.stop_reason = "stop", stop_token_id
        else:
            check_stop_str = len(c.token_ids) >= c.params.min_tokens
            matched = c.detok.add_token(token_id, check_stop=check_stop_str)
            if matched is not None:
                c.finish_reason, c.stop_reason = "stop", matched
            elif finish_reason == "length":
                c.finish_reason = "length"
        if c.finish_reason is not None:
            c.detok.finish()
        return state

    def process_prompt_logprobs(self, seq_id: str, first_position: int, logprobs: list[Logprobs]) -> None:
        """Record the prompt logprobs of one chunk, the first at prompt position
        ``first_position``; positions already recorded (a chunk recomputed after a
        preemption) are skipped."""
        state, _ = self.by_seq[seq_id]
        have = state.prompt_logprobs
        if have is None:
            return
        for position, lp in enumerate(logprobs, start=first_position):
            if position == len(have):
                have.append(lp)

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
        prompt_logprobs = None
        if (state.prompt_logprobs is not None and not state.prompt_logprobs_sent
                and len(state.prompt_logprobs) == len(state.prompt_token_ids)):
            prompt_logprobs, state.prompt_logprobs_sent = state.prompt_logprobs, True
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outs, finished,
                             state.num_cached_tokens, state.metrics, prompt_logprobs=prompt_logprobs)

    def remove(self, state: RequestState) -> None:
        self.states.pop(state.request_id, None)
        for c in state.completions:
            self.by_seq.pop(c.seq_id, None)
