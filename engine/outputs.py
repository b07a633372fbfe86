"""What the engine returns to its callers, offline or streaming."""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.output import Logprobs  # re-exported: the engine's callers take it from here

FINISH_REASONS = ("stop", "length", "abort", "time_limit")


@dataclass
class CompletionOutput:
    """One completion of a request (``index`` among its ``n``).

    In a streamed (delta) output, ``text``, ``token_ids`` and ``logprobs``
    hold only what is new since the previous output of this completion.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None        # None while running, then "stop" / "length" / "abort" / "time_limit"
    stop_reason: str | int | None = None    # the matched stop string or stop token id
    logprobs: list[Logprobs] | None = None  # one per token when asked

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (``time.time()``) of one request."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_generation_tokens: int = 0          # sampled so far, all completions together

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


@dataclass
class RequestOutput:
    """The outputs of one prompt (all its ``n`` completions)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0              # prompt tokens served from the prefix cache
    metrics: RequestMetrics | None = None
    emitted_time: float | None = None       # when the AsyncEngine handed this delta over (time.time())
    # With SamplingParams.prompt_logprobs: one entry per prompt token (the first None), in the one delta
    # that follows the prompt's last chunk (and in the offline API's final output); else None.
    prompt_logprobs: list[Logprobs | None] | None = None

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
